"""Study launch, Ray Tune + Optuna wiring, reports."""
