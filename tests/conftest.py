import os

from hypothesis import settings

# CI runs the same examples every time, so a red run is reproducible; locally
# hypothesis explores new ones on every run.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
