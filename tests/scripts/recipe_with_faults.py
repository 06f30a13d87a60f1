"""Run a recipe as ``python RECIPE ARGS`` does, with a data fault only a large or broken data set has.

    python recipe_with_faults.py [--check-up-to N] [--hang NAME] RECIPE ARGS...

``--check-up-to N``: image folders and pairs files decode at most N images before training (the recipes'
limit is 10,000), so a bad image beyond it is met by a DataLoader worker mid-run, as in a large folder.
``--hang NAME``: opening the shard whose file name is NAME blocks forever, as on a hung network mount.
"""

import runpy
import sys
import time

import stepkit.data.images
import stepkit.data.pairs
import stepkit.data.streams

args = sys.argv[1:]
while args[0].startswith("--"):
    flag, value, args = args[0], args[1], args[2:]
    if flag == "--check-up-to":
        stepkit.data.images.find_image_data.__kwdefaults__["check_up_to"] = int(value)
        stepkit.data.pairs.read_pairs.__kwdefaults__["check_up_to"] = int(value)
    elif flag == "--hang":
        read = stepkit.data.streams.shard_samples

        def hang_on(path, *a, _read=read, _name=value, **kw):
            while str(path).endswith(_name):
                time.sleep(3600)
            return _read(path, *a, **kw)

        stepkit.data.streams.shard_samples = hang_on  # as the streams read it
    else:
        raise SystemExit(f"unknown flag {flag}")
sys.argv = args
runpy.run_path(args[0], run_name="__main__")
