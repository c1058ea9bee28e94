"""``python -m benchmarks [--small] [--out DIR] [--only NAME ...]``."""

from benchmarks import suite

if __name__ == "__main__":
  raise SystemExit(suite.main())
