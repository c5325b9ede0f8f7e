"""The one configuration object of the node.

Sources, highest priority first: command-line flags, ``DICOMAI_<SECTION>__<KEY>``
environment variables, the TOML file (``--config FILE``, else ``DICOMAI_CONFIG``, else
``/etc/dicomai/dicomai.toml`` when it exists: :func:`find_config`), and the embedded
defaults (documented key by key in ``config/dicomai.toml``). Validation happens once, at
start-up; an unknown key or a bad value raises :class:`~dicomai.errors.ConfigError` naming
it and where it came from. Loading reads the environment it is given and changes nothing.
"""


from dicomai.config.sections import (
    AccessConfig,
    AllowedCaller,
    DatabaseConfig,
    LogFormat,
    LoggingConfig,
    ModelConfig,
    NodeConfig,
    ScopeConfig,
    StorageConfig,
    StudiesConfig,
    subject_key,
)
from dicomai.config.services import (
    ClientCertificates,
    Destination,
    HttpConfig,
    OutboxConfig,
    Output,
    ResultsConfig,
    RetentionConfig,
    ScStyle,
    TlsConfig,
    WebConfig,
)
from dicomai.config.settings import (
    CONFIG_ENV,
    ENV_PREFIX,
    SYSTEM_CONFIG,
    Settings,
    find_config,
    load_settings,
    mask_url,
    masked,
)

__all__ = [
    "AccessConfig",
    "AllowedCaller",
    "CONFIG_ENV",
    "ClientCertificates",
    "DatabaseConfig",
    "Destination",
    "ENV_PREFIX",
    "HttpConfig",
    "LogFormat",
    "LoggingConfig",
    "ModelConfig",
    "NodeConfig",
    "OutboxConfig",
    "Output",
    "ResultsConfig",
    "RetentionConfig",
    "SYSTEM_CONFIG",
    "ScStyle",
    "ScopeConfig",
    "Settings",
    "StorageConfig",
    "StudiesConfig",
    "TlsConfig",
    "WebConfig",
    "find_config",
    "load_settings",
    "mask_url",
    "masked",
    "subject_key",
]
