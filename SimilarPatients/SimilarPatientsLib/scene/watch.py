"""The scene's lifecycle as the module needs it: a call when the scene starts closing (Close Scene, loading
another scene) and one for each node removed, so that results which name nodes (the query's CT, the
comparison's views) are dropped with them.

A closed scene hands out node IDs again from the start (``vtkMRMLScene::Clear`` forgets the IDs it issued),
so the next CT loaded gets the removed query's ID: what is compared here and by the module is the node
object, never its ID. Plain VTK observers on Slicer's scene, or in the tests on ``slicer-core``'s.
"""

from __future__ import annotations

from collections.abc import Callable


class SceneWatch:
    """Calls ``closing()`` when ``scene`` starts closing and ``removed(node)`` for each node removed from it,
    until :meth:`remove`."""

    def __init__(self, scene, closing: Callable[[], None], removed: Callable[[object], None]):
        import vtk

        def node_removed(_scene, _event, node):
            removed(node)

        node_removed.CallDataType = vtk.VTK_OBJECT  # VTK hands the removed node to the callback
        self.scene = scene
        self._tags = [
            scene.AddObserver(scene.StartCloseEvent, lambda *_: closing()),
            scene.AddObserver(scene.NodeRemovedEvent, node_removed),
        ]

    def remove(self) -> None:
        for tag in self._tags:
            self.scene.RemoveObserver(tag)
        self._tags = []


__all__ = ["SceneWatch"]
