"""What the Slicer module talks to: the image query run in a child process it can poll and cancel."""
