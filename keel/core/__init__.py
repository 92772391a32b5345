"""Settings, store, errors, ids, clock and logging: the ground every capability stands on."""
