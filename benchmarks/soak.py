"""The soak: N mixed requests at concurrency C against a real TorchServe, every answer checked, the
workers' memory sampled — ``python benchmarks/soak.py --help``. Its machinery lives in
``tests/soakkit.py``, shared with the quick soak of the test suite (tests never import benchmarks).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from soakkit import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
