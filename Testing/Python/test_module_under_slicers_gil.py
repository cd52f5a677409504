"""The module's long jobs finish while the GUI thread holds the GIL between timer ticks, as Slicer's idle Qt
event loop does (``slicer_idle.py``): importing NLST-Sybil, a fused search by patient and a CT-FM search
by patient, each driven through the controller and polled once a tick. On a thread of the GUI's process
the same work ran only during the polls (5-9 times slower, ``benchmarks/gil.py``); in the worker process
it runs at its own pace, and the GUI only reads the answer."""

from __future__ import annotations

import sys
import threading

import pytest
from conftest import NLST_DIR
from SimilarPatientsLib.references import FUSED_CHOICE
from SimilarPatientsLib.ui import Inputs, MemorySettings, ModuleController, ModuleLogic, ModuleSettings
from slicer_idle import poll_like_slicer
from test_module_controller import RecordingInstaller, RecordingView


def _until_done(controller) -> float:
    def tick():
        controller.poll(0)
        return not controller.busy

    return poll_like_slicer(tick, gil_held=True, timeout=120)


def test_the_gui_thread_of_the_harness_holds_the_gil_while_it_sleeps():
    """The harness is faithful: a thread of this process gets little done while the main thread sleeps
    holding the GIL (it runs only in the switches at each tick), against a sleep that releases it."""
    import time

    from slicer_idle import hold_gil

    counted, stop = [0], threading.Event()

    def count():
        while not stop.is_set():
            counted[0] += 1

    thread = threading.Thread(target=count, daemon=True)
    thread.start()
    done = {}
    for held, sleep in ((True, hold_gil), (False, time.sleep)):
        before = counted[0]
        for _ in range(6):
            sleep(0.05)
        done[held] = counted[0] - before
    stop.set()
    thread.join()
    assert done[True] < done[False] / 2, done  # about one 5 ms switch per 50 ms tick when held


@pytest.mark.slow
def test_an_import_and_searches_by_patient_finish_while_the_gui_thread_holds_the_gil(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMILARPATIENTS_NLST_SYBIL_DIR", str(NLST_DIR))
    logic = ModuleLogic(ModuleSettings(MemorySettings()), tmp_path / "home", python=sys.executable)
    view = RecordingView()
    controller = ModuleController(view, logic, installer=RecordingInstaller())
    try:
        controller.import_nlst()
        _until_done(controller)
        assert view.last("show_status") == ("NLST-Sybil imported: choose a model and search.",)
        assert "nlst-sybil" in view.last("show_references")[0]
        for model in (FUSED_CHOICE, "CTFM"):
            controller.find_by_patient(Inputs(reference="nlst-sybil", model=model, k=10, patient="100242"))
            _until_done(controller)
            assert len(controller.hits) == 10 and "100242" not in set(controller.hits.PatientID)
            assert controller.hits.closer_than.between(0, 100).all()
        assert not view.of("show_error")
    finally:
        logic.cleanup()
