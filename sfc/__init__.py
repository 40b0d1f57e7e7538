"""The ``sfc`` command line: it sits on top of every package and nothing imports it."""
