"""Prints the requirements of netmoe with the given extras, one per line, from pyproject.toml:
the images install them in a layer of their own, before netmoe's sources are copied, so that a
change to the sources rebuilds only the small install of netmoe itself.
    python requirements.py PYPROJECT EXTRA..."""

import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
extras = project["optional-dependencies"]
for name in sys.argv[2:]:
    if name not in extras:
        sys.exit(f"requirements.py: no extra {name!r} in {sys.argv[1]} (it has {sorted(extras)})")
print("\n".join(dict.fromkeys([*project["dependencies"],
                               *(req for name in sys.argv[2:] for req in extras[name])])))
