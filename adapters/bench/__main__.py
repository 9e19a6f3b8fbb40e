"""The bench worker: ``python -m adapters.bench CASE.json RESULT.json`` (started by `worker.run_case`)."""
import sys

from .worker import work

if len(sys.argv) != 3:
    sys.exit("usage: python -m adapters.bench CASE.json RESULT.json (started by adapters bench, one per case)")
sys.exit(work(sys.argv[1], sys.argv[2]))
