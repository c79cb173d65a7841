"""What the command-line verbs and the lab share: the model-spec flags, loading a spec in-process, the machine line."""
