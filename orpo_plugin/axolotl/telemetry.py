"""Axolotl's usage telemetry in a run declared offline.

Axolotl sends usage events to PostHog unless `AXOLOTL_DO_NOT_TRACK=1` (or `DO_NOT_TRACK=1`) is set. It reads that
switch once, when `axolotl.cli.config` is imported, before any plugin is loaded, and registers an exit handler that
flushes PostHog's queue. Offline, every upload fails: PostHog's sender thread retries each batch (4 tries with
exponential backoff; where the network drops packets instead of refusing them, each try is a request with a 15 s
timeout and 2 more connection attempts), and the flush at exit waits for all of it. `axolotl train` offline was seen
to train and save in 20 s and not exit after 590 s, logging failed telemetry connections. Where the name lookup of
PostHog's host fails at once (measured on a 2-core CPU machine without internet, Axolotl 0.19.0, PostHog 6.7.11),
each batch gives up after 4 tries in about 2 s and `axolotl train` exits about 5 s after saving.

A run declared offline (`HF_HUB_OFFLINE=1`, the switch every offline Hugging Face run already needs) cannot send the
events, so when the plugin is registered it turns Axolotl's telemetry off for the rest of the run, drops the events
queued so far, stops PostHog's sender thread, and says so. Online runs are left as they are.
"""

from __future__ import annotations

import logging
import os

LOG = logging.getLogger("orpo_plugin.axolotl")
OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def offline_declared() -> bool:
    return any(_truthy(name) for name in OFFLINE_SWITCHES)


def _drop_queued_events() -> int:
    """Empty PostHog's queue of unsent events (so that a flush at exit has nothing to wait for)."""
    import queue

    try:
        import posthog
    except ImportError:
        return 0
    client = getattr(posthog, "default_client", None)
    pending = getattr(client, "queue", None)
    dropped = 0
    while pending is not None:
        try:
            pending.get_nowait()
        except queue.Empty:
            break
        pending.task_done()
        dropped += 1
    for consumer in getattr(client, "consumers", None) or []:
        consumer.pause()
    return dropped


def stop_telemetry_when_offline() -> bool:
    """Turn Axolotl's telemetry off when the run is declared offline; True when it was on and is now off."""
    if not offline_declared():
        return False
    try:
        from axolotl.telemetry.manager import TelemetryManager
    except ImportError:  # an Axolotl without telemetry
        return False
    manager = TelemetryManager.get_instance()
    if not getattr(manager, "enabled", False):
        return False
    manager.enabled = False  # no more events, and its exit handler no longer flushes
    os.environ["AXOLOTL_DO_NOT_TRACK"] = "1"  # processes started from here (accelerate workers) read it at import
    dropped = _drop_queued_events()
    LOG.warning(
        "Axolotl telemetry turned off for this run: HF_HUB_OFFLINE is set, so its uploads could only fail and be "
        "retried, and the process would wait for them at exit (%d queued event(s) dropped). Set "
        "AXOLOTL_DO_NOT_TRACK=1 to keep it off from the start.",
        dropped,
    )
    return True
