"""`python -m batch_bridge.emulator [OPTIONS]`: the same command as `batch-bridge emulator`."""

from .cli import emulator

if __name__ == "__main__":
    emulator(prog_name="python -m batch_bridge.emulator")
