"""``python -m lit_cascades.functional._native``: build every native kernel ahead of time."""

from lit_cascades.functional._native import main

main()
