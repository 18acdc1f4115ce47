"""Write the service templates of launchd/ and packaging/systemd/ from exod/service/templates.py.

python tools/gen_service_files.py          write them
python tools/gen_service_files.py --check  exit 1 when a checked-in one is stale
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exod.service import templates  # noqa: E402  # after the checkout is importable


def _executable(path: Path) -> int:
    # Of the mode only the executable bit counts: git keeps nothing else, the umask the rest.
    return 0o111 if path.stat().st_mode & 0o100 else 0


def stale() -> list[str]:
    out = []
    for name, (content, mode) in templates.files().items():
        path = ROOT / name
        if not path.is_file() or path.read_bytes() != content or _executable(path) != mode & 0o111:
            out.append(name)
    return out


def main() -> int:
    if sys.argv[1:] == ["--check"]:
        names = stale()
        for name in names:
            print(f"{name} is stale: run `python tools/gen_service_files.py`", file=sys.stderr)
        return 1 if names else 0
    for name, (content, mode) in templates.files().items():
        path = ROOT / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        os.chmod(path, mode)
        print(f"wrote {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
