"""Oneshot: print its arguments as a JSON object (for the `{input}` argv placeholder)."""

import json
import sys

print(json.dumps({"args": sys.argv[1:]}))
