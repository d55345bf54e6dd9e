"""What runs: stage and pipeline definitions, the stepper and the Engine facade."""
