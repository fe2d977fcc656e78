"""gogpt: a self-hosted gateway that keeps the OpenAI and ChatGPT keys and hands clients tokens."""

from .app import create_app
from .auth import mint_token
from .config import ConfigError, Settings, load_settings

__all__ = ["ConfigError", "Settings", "create_app", "load_settings", "mint_token"]
__version__ = "0.1.0"
