"""``python -m featurerec`` runs the CLI."""

from featurerec.cli import main

main()
