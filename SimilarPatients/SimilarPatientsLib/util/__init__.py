"""What every stage uses: the data home, atomic writes, verified downloads, optional imports."""
