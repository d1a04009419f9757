"""`python -m kart_lightning fit|validate|test`: the command line."""

from kart_lightning.cli import main

if __name__ == "__main__":
    main()
