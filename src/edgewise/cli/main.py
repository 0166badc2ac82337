"""`edgewise` command line: thin typer commands over the parts.

Imports are lazy so that `edgewise agent` on a device loads only what the agent
needs (no FastAPI, SQLAlchemy or scikit-learn in its memory).
"""

from __future__ import annotations

import typer

from . import bundle_cmd, keys_cmd, release_cmd

app = typer.Typer(
    name="edgewise",
    help="Take a trained model to a fleet of edge devices and keep it healthy there.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(keys_cmd.app, name="keys")
app.add_typer(bundle_cmd.app, name="bundle")
app.add_typer(release_cmd.app, name="agent-release")


@app.command("version")
def version() -> None:
    """Print the edgewise version."""
    from .. import __version__

    typer.echo(__version__)


def _register() -> None:
    from . import agent_cmd, compress_cmd, demo_cmd, optimize_cmd, server_cmd

    app.command("agent")(agent_cmd.agent)
    app.command("server")(server_cmd.server)
    app.command("demo")(demo_cmd.demo)
    app.command("optimize")(optimize_cmd.optimize)
    app.command("prune")(compress_cmd.prune)
    app.command("distill")(compress_cmd.distill)
    app.command("compress")(compress_cmd.compress)
    from . import pipeline_cmd

    app.command("release")(pipeline_cmd.release)
    from . import dann_cmd

    app.command("dann")(dann_cmd.dann)
    from . import tuf_cmd

    app.add_typer(tuf_cmd.app, name="tuf")
    from . import device_cmd

    app.add_typer(device_cmd.app, name="device")
    from . import access_cmd

    app.add_typer(access_cmd.user_app, name="user")
    app.add_typer(access_cmd.token_app, name="token")
    from . import samples_cmd

    app.add_typer(samples_cmd.app, name="samples")
    from . import group_cmd  # issue 7, part TARGET

    app.add_typer(group_cmd.app, name="group")
    from . import rollout_cmd  # issue 7, part ROLLOUT

    app.add_typer(rollout_cmd.app, name="rollout")
    from . import sim_cmd  # issue 7, part SIM

    app.command("sim")(sim_cmd.sim)
    from . import fl_cmd  # issue 8, part FL-SYSTEM

    app.add_typer(fl_cmd.app, name="fl")
    from . import privacy_cmd  # issue 8, part FL2

    app.add_typer(privacy_cmd.app, name="privacy")
    from . import gateway_cmd  # issue 9, part GATEWAY

    app.command("gateway")(gateway_cmd.gateway)


_register()

if __name__ == "__main__":
    app()
