"""Training with the paper's recipe: the typed config, the trainer's inputs, the schedule, the loop, run state
(RNG and checkpoint schema, resume) and reporting."""
