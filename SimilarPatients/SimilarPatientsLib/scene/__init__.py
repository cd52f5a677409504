"""What the Slicer module talks to: Slicer nodes turned into the library's LPS image and tumors
(``nodes``), and the image query run in a child process it can poll and cancel (``process``).

It sits above every stage; nothing in the library imports it. It takes vtk and the MRML classes only
inside its functions, from Slicer or, in the tests, from ``slicer-core``.
"""
