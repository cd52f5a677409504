"""Stands in for idc-index inside the query worker (a test puts this folder first on the worker's path, see
conftest.WorkerBucket): ``IDCClient.download_from_selection`` copies the series a test wrote out of a JSON
description, through a child process, as idc-index runs s5cmd in one, a file at a time with an optional
pause, so that a test can cancel mid-series and check that the child is gone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

#: The child's work: copy every file of a folder into the target, pausing between files (s5cmd's place).
COPY = """
import os, shutil, sys, time
source, target, pause = sys.argv[1], sys.argv[2], float(sys.argv[3])
os.makedirs(target, exist_ok=True)
for name in sorted(os.listdir(source)):
    shutil.copy(os.path.join(source, name), os.path.join(target, name))
    time.sleep(pause)
"""


class IDCClient:
    def download_from_selection(
        self,
        seriesInstanceUID,
        downloadDir,
        source_bucket_location="aws",
        dirTemplate="%collection_id/%PatientID/%StudyInstanceUID/%Modality_%SeriesInstanceUID",
        quiet=True,
        show_progress_bar=True,
    ):
        # idc-index (index.py, download_from_selection): "source_bucket_location: string selecting the provider
        # of the bucket ... between Google ('gcs') and AWS ('aws') storage. Defaults to 'aws'." Anything else:
        # ValueError. "show_progress_bar (bool): If True, tracks the progress of download" (tqdm on the console).
        if source_bucket_location not in ("aws", "gcs"):
            raise ValueError("source_bucket_location must be either 'aws' or 'gcs'")
        with open(os.environ["SIMILARPATIENTS_TEST_BUCKET"], encoding="utf-8") as stream:
            bucket = json.load(stream)
        for uid in seriesInstanceUID:
            # "dirTemplate ... When set to None all files will be downloaded to the download directory with no
            # subdirectories"
            flat = dirTemplate is None
            target = downloadDir if flat else os.path.join(downloadDir, "nlst", "patient", "study", f"CT_{uid}")
            child = subprocess.Popen([sys.executable, "-c", COPY, bucket["series"][uid], target, str(bucket["pause"])])
            with open(bucket["log"], "a", encoding="utf-8") as log:
                log.write(json.dumps({"uid": uid, "pid": child.pid, "staging": downloadDir}) + "\n")
            child.wait()
