"""What a run reports to a person: result tables and lines, heat-maps, per-class plots, the training
history, the run record, and the after-training analysis figures."""
