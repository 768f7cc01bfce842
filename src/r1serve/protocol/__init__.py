"""OpenAI wire types (pydantic), no logic. See openai.py."""

from r1serve.protocol.openai import *  # noqa: F401,F403
