"""Applications wired from the parts: the simulation-to-table pipeline, and RLHF as one of
its steps. The only library package that may import eval and data_prep; nothing in the library
imports it."""
