"""host/signals.py with real signals sent to this process."""

from __future__ import annotations

import os
import signal

import pytest

from aiia_ops.host.signals import Interrupted, interruptible, shielded


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_term_and_hup_raise_interrupted_inside_and_restore_the_handler(signum):
    before = signal.getsignal(signum)
    recovered = []
    with pytest.raises(Interrupted) as caught, interruptible():
        try:
            os.kill(os.getpid(), signum)
            signal.sigtimedwait([], 0)  # let the handler run
            raise AssertionError("the signal did not interrupt the block")
        except BaseException:
            recovered.append(True)  # a recovery's `except BaseException` sees it
            raise
    assert caught.value.signum == signum and recovered == [True]
    assert "interrupted by SIG" in str(caught.value)
    assert signal.getsignal(signum) == before


def test_a_signal_inside_shielded_waits_for_the_block_then_raises():
    done = []
    with pytest.raises(Interrupted), interruptible(), shielded():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        done.append("resume sent")  # the recovery finishes first
    assert done == ["resume sent"]


@pytest.fixture
def ctrl_c_raises():
    """Python's own SIGINT handler for the test, whatever the run inherited: a process
    started in the background (`cmd &` without job control, nohup) ignores SIGINT, and
    Python then installs no handler (the clean-clone check, run that way, failed here)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_ctrl_c_held_in_shielded_is_a_keyboard_interrupt_afterwards(ctrl_c_raises):
    with pytest.raises(KeyboardInterrupt), shielded():
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_shielded_does_not_hide_the_blocks_own_error():
    with pytest.raises(ValueError), shielded():
        os.kill(os.getpid(), signal.SIGTERM)
        raise ValueError("the recovery's own failure")
