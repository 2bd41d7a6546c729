"""``python -m wsi_espnet``: the same as the ``wsi-espnet`` command."""

from wsi_espnet.cli import main

main()
