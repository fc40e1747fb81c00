"""convert()'s rules for the layers of other libraries, one module per library.

Each module defines `rules() -> list[fastattn.convert.Rule]` and the fused twins
its rules build. fastattn.convert imports a module only once its library has
been imported (a model can hold that library's layers only then): the libraries
are optional at run time and cost nothing when unused.
"""
