"""The configuration of the balancer, below both the balancer and the shared pool.

- `table`: THE declaration, one `Setting` row per setting (apps/config/row.py);
- `parsers`: the value types (`Backend`, networks, sizes...) and their parsers;
- `settings`: `Settings`, built from the rows, and `load_settings`;
- `markdown`: docs/settings.md's table, generated (`python -m apps.config`).
"""
from apps.config.parsers import (
    REDIS_SCHEMES, Backend, Network, address_in, is_ip, number, parse_backends, parse_bool,
    parse_choice, parse_networks, parse_path, parse_pool_name, parse_port, parse_redis_url,
    parse_seconds, parse_size, parse_statuses, quoted)
from apps.config.row import SCRIPTS, Setting
from apps.config.settings import (
    Settings, SettingsError, load_settings, redis_url_default, script_params)
from apps.config.table import DEFAULT_REDIS_PORT, STRATEGIES, TABLE

__all__ = [
    "DEFAULT_REDIS_PORT", "REDIS_SCHEMES", "SCRIPTS", "STRATEGIES", "TABLE", "Backend",
    "Network", "Setting", "Settings", "SettingsError", "address_in", "is_ip",
    "load_settings", "number", "parse_backends", "parse_bool", "parse_choice",
    "parse_networks", "parse_path", "parse_pool_name", "parse_port", "parse_redis_url",
    "parse_seconds", "parse_size", "parse_statuses", "quoted", "redis_url_default",
    "script_params"]
