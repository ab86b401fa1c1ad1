"""One client for OpenAI-compatible chat endpoints, shared by the descriptor generator and the EX2 judge."""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request


class OpenAIChat:
    """An OpenAI-compatible ``/chat/completions`` endpoint (OpenAI, vLLM, llama.cpp server, ...).

    Plain urllib rather than the ``openai`` package: one POST needs no extra dependency, and the
    same code talks to any compatible server. The key is read from the environment variable ``api_key_env``
    (never from a file); ``api_key_env=None`` for a local server that needs no key.
    """

    def __init__(
        self,
        model: str,
        base_url: str = "https://api.openai.com/v1",
        api_key_env: str | None = "OPENAI_API_KEY",
        temperature: float = 0.0,
        max_tokens: int = 200,
        timeout: float = 60.0,
    ) -> None:
        self.key = os.environ.get(api_key_env) if api_key_env else None
        if api_key_env and not self.key:
            raise RuntimeError(
                f"Environment variable {api_key_env} is not set: export the API key there "
                "(or pass api_key_env=None for a local server without keys)."
            )
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.temperature, self.max_tokens, self.timeout = model, temperature, max_tokens, timeout
        self.params = {
            "backend": "openai",
            "model": model,
            "base_url": base_url,
            "temperature": temperature,
            "max_tokens": max_tokens,
        }

    def __call__(self, prompt: str) -> str:
        """The reply to one user message."""
        return self.chat([{"role": "user", "content": prompt}])

    def chat(self, messages: list[dict[str, str]], **extra) -> str:
        """The reply to a conversation (``[{"role", "content"}, ...]``); ``extra`` goes into the request body
        (e.g. ``response_format={"type": "json_object"}``)."""
        body = json.dumps(
            {
                "model": self.model,
                "messages": messages,
                "temperature": self.temperature,
                "max_tokens": self.max_tokens,
                **extra,
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        request = urllib.request.Request(self.url, data=body, method="POST", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                reply = json.loads(response.read())
        except urllib.error.HTTPError as err:
            raise RuntimeError(
                f"{self.url} answered HTTP {err.code}: {err.read()[:300]!r}. Check the model name and the API key."
            ) from err
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            raise ConnectionError(
                f"Could not reach the LLM endpoint {self.url} ({err}). Is the server running and llm_base_url right?"
            ) from err
        except json.JSONDecodeError as err:
            raise RuntimeError(f"{self.url} did not answer with JSON ({err}).") from err
        try:
            return reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as err:
            raise RuntimeError(f"{self.url} returned no chat completion: {str(reply)[:300]}") from err


def endpoint_problem(base_url: str, api_key_env: str | None, timeout: float = 5.0) -> str | None:
    """Why an OpenAI-compatible endpoint cannot be used, in words, or None when it can.

    Checks that the key variable is set and that the server answers at all (``GET <base_url>/models``;
    any HTTP status counts as an answer, since some servers do not implement that route).
    """
    if api_key_env and not os.environ.get(api_key_env):
        return f"the environment variable {api_key_env} holding the API key is not set"
    if not re.match(r"https?://", base_url):
        return f"{base_url!r} is not an http(s) URL"
    try:
        urllib.request.urlopen(base_url.rstrip("/") + "/models", timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, TimeoutError, ConnectionError, ValueError) as err:
        reason = getattr(err, "reason", err)
        return f"the endpoint {base_url} is unreachable ({reason})"
    return None
