"""``bindpipe``: the one command-line entry point."""

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Port-binding control plane: ML2-compatible bindings with Nova-strict PCI accounting.")


@app.command("dry-run")
def dry_run(path: str = typer.Argument(..., metavar="FILE|-", help="JSON list of scenarios, '-' for stdin")) -> None:
    """Bind each scenario's port offline (no broker, no database) and print the results as JSON."""
    from pipeline.dry_run import main_dry_run

    raise typer.Exit(main_dry_run(path))


@app.command("pci-dry-run")
def pci_dry_run(path: str = typer.Argument(..., metavar="FILE|-", help="JSON list of PCI scenarios, '-' for stdin")) -> None:
    """What-if for a host's PCI devices: run allocate/release sequences by Nova's rules, print every state."""
    from pipeline.pci_dry_run import main_pci_dry_run

    raise typer.Exit(main_pci_dry_run(path))
