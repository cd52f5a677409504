"""What the Slicer module talks to: Slicer nodes turned into the library's LPS image and tumors
(``nodes``), the side-by-side views of a query and its matches (``layout``), and the persistent query
worker it can poll and cancel (``worker``).

It sits above every stage; nothing in the library imports it. It takes vtk and the MRML classes only
inside its functions, from Slicer or, in the tests, from ``slicer-core``.
"""
