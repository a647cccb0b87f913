"""Clinical formats and reports around a label map: statistics, structure subsets, previews, Slicer files.

Plain modules that take and return numpy arrays and paths; none talks to Triton. Structure names and
colours are arguments (lists indexed by label value, entry 0 = background), so each module is
usable with any label table.
"""
