"""convert()'s rules for the layers of other libraries, one module per library.

Each module defines `rules() -> list[fastattn.convert.Rule]` and the fused twins
its rules build. fastattn.convert imports a module only when its library is
installed: the libraries are optional at run time.
"""
