"""Config errors: each names the key path, what is wrong, and what is allowed."""

from __future__ import annotations

from voxpipe.pipeline.errors import VoxpipeError


class ConfigError(VoxpipeError):
    """One or more problems in a config file."""

    def __init__(self, path: str, problem: str, allowed: str = "", *, file: str | None = None) -> None:
        self.problems: list[tuple[str, str, str]] = [(path, problem, allowed)]
        self.file = file
        super().__init__(self._render())

    @classmethod
    def many(cls, problems: list[tuple[str, str, str]], file: str | None = None) -> ConfigError:
        error = cls(*problems[0], file=file)
        error.problems = problems
        error.args = (error._render(),)
        return error

    def with_file(self, file: str) -> ConfigError:
        return ConfigError.many(self.problems, file)

    def _render(self) -> str:
        lines = [f"{self.file}: invalid config" if self.file else "invalid config"]
        for path, problem, allowed in self.problems:
            line = f"  {path or '(top level)'}: {problem}"
            if allowed:
                line += f" (allowed: {allowed})"
            lines.append(line)
        return "\n".join(lines)
