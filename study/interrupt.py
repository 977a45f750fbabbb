"""Ctrl+C (SIGINT) or SIGTERM during a study: Tune stops as on Ctrl+C, saves its state, and the
launch ends with exit code 128 + the signal's number (130, 143) and the exact --resume command
(README, "Reliability")."""

import os
import signal

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal:
    """While Tune's loop runs, SIGINT and SIGTERM stop it as Tune stops on Ctrl+C: it ends its loop,
    saves its state once more, and the unfinished trials stay unfinished for --resume. (Tune's
    handler is reached through SIGUSR1's, which Tune installs whatever TUNE_DISABLE_SIGINT_HANDLER
    says; without that variable Tune's own SIGINT handler would replace this one, and it knows no
    SIGTERM.) A second signal, or one before Tune listens, stops at once (KeyboardInterrupt), as
    Tune's second Ctrl+C does; `signum` keeps the first."""

    def __init__(self):
        self.signum = None
        self.at_once = False  # a second signal (or one before Tune listened) stopped the study at once
        self.previous = {}

    def __enter__(self) -> "StopOnSignal":
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        for signum in SIGNALS:
            self.previous[signum] = signal.signal(signum, self._stop)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _stop(self, signum, frame) -> None:
        tune_stops = signal.getsignal(signal.SIGUSR1)
        first = self.signum is None
        self.signum = self.signum or signum
        if not first or not callable(tune_stops):
            self.at_once = True
            raise KeyboardInterrupt
        tune_stops(signum, frame)

    @property
    def exit_code(self) -> int | None:
        """128 + the signal's number, as a shell reports a process a signal ended; None if none came."""
        return None if self.signum is None else 128 + self.signum

    def line(self, study: str, resume_command: str, reported: bool) -> str:
        """The one line an interrupted launch ends with: what stopped it, what was kept, how to go on."""
        saved = ("it stopped at once, so Tune's state is the last it saved before the signal" if self.at_once
                 else "Tune saved its state")
        report = "; its report marks it unfinished" if reported else ""
        return (f"error: study {study} was interrupted ({signal.Signals(self.signum).name}) before it finished; "
                f"{saved}{report}; continue it with: {resume_command}")
