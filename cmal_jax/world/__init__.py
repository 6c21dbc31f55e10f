"""The embedded synthetic world: scenes, captions, downstream tasks, and
their generation into a workdir."""
