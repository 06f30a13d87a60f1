"""The recipes, one complete script per method; installed as ``stepkit.recipes`` (``stepkit ls``)."""
