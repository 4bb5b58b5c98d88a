"""The stack's secrets as values: which keys exist, and types that never show them.

`host/secrets.py` generates and stores them; rendering and compose take these types.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# REDIS_PASSWORD (shared) is Redis' default user: health check, monitor, restore's FLUSHDB.
SHARED_KEYS = (
    "POSTGRES_PASSWORD",
    "REDIS_PASSWORD",
    "PGBOUNCER_ADMIN_PASSWORD",
    "REDIS_ADMIN_PASSWORD",
)
# pgBackRest's repository key (aes-256-cbc) and the off-site S3 store's access keys: generated
# like the others (the lab's store is configured with them); for a real store the operator
# writes its keys into shared.env. Without the cipher key the off-site copy is unreadable:
# keep a copy of shared.env off the server (docs/backups-offsite.md).
OFFSITE_KEYS = ("PGBACKREST_CIPHER_PASS", "OFFSITE_S3_KEY", "OFFSITE_S3_SECRET")
# REDIS_PASSWORD (per environment) is the environment's own Redis ACL user's.
ENV_KEYS = ("DB_PASSWORD", "SECRET_KEY", "API_WRITE_TOKEN", "REDIS_PASSWORD")


@dataclass(frozen=True, repr=False)
class EnvSecrets:
    db_password: str
    secret_key: str
    api_write_token: str = ""  # bearer token of the app's write API
    redis_password: str = ""  # its Redis ACL user's (empty: the user cannot log in)

    def __repr__(self) -> str:
        return "EnvSecrets(********)"


@dataclass(frozen=True, repr=False)
class Secrets:
    postgres_password: str
    redis_password: str
    pgbouncer_admin_password: str
    environments: dict[str, EnvSecrets] = field(default_factory=dict)
    redis_admin_password: str = ""  # Redis' admin user (empty: it cannot log in)
    pgbackrest_cipher_pass: str = ""  # the off-site repository's encryption key
    offsite_s3_key: str = ""
    offsite_s3_secret: str = ""

    def __repr__(self) -> str:
        return f"Secrets(******** for {', '.join(self.environments) or 'no environment'})"

    __str__ = __repr__

    def values(self) -> list[str]:
        out = [self.postgres_password, self.redis_password, self.pgbouncer_admin_password]
        out += [self.redis_admin_password]
        out += [self.pgbackrest_cipher_pass, self.offsite_s3_key, self.offsite_s3_secret]
        for env in self.environments.values():
            out += [env.db_password, env.secret_key, env.api_write_token, env.redis_password]
        return [v for v in out if v]  # an unset (empty) one is no secret to redact
