"""The Slicer module's first-use install, run into this Python exactly as the module runs it in Slicer
(``ui/dependencies.py``): the one plan of a first use without torch (the search packages, idc-index,
google-cloud-bigquery as when BigQuery is allowed), its dry run, and the one pip call whose constraints pin
Slicer's packages and whatever is imported. scripts/slicer_lanes.sh builds its "installed" lanes with it.

    PYTHONPATH=SimilarPatients .lanes/<lane>/bin/python scripts/first_use_install.py
"""

from __future__ import annotations

import sys

from SimilarPatientsLib.ui import dependencies


def main() -> None:
    plan = dependencies.plan(*dependencies.companions(bigquery_allowed=True))
    installer = dependencies.SlicerInstaller(python=sys.executable, testing=False)
    installer.resolve(plan)
    if plan.replaces:
        sys.exit(plan.restart_question())
    print("first-use install:", ", ".join(r.pip for r in plan.packages) or "nothing missing")
    installer.install(plan)


if __name__ == "__main__":
    main()
