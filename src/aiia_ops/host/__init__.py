"""The only code that acts on a host: runners (local, SSH, printing, recording), the engine
client, files, locks, git, the secrets store, the notifier."""
