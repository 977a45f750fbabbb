"""The argument parser of every command line here: a usage error is one line naming the problem
and exit code 2, like every other user error (the whole usage stays behind --help)."""

import argparse


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")
