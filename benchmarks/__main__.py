"""``python -m benchmarks [--small] [--out DIR] [--only NAME ...]``, or ``python -m benchmarks --device [--small]``."""

import sys

from benchmarks import suite

if __name__ == "__main__":
  if "--device" in sys.argv[1:]:
    from benchmarks import device  # pylint: disable=import-outside-toplevel
    raise SystemExit(device.main([a for a in sys.argv[1:] if a != "--device"]))
  raise SystemExit(suite.main())
