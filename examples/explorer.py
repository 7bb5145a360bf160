#!/usr/bin/env python
"""The STELLAR explorer: a Gradio page to see an image's sparse tokens and spatial maps, and to edit them.

    python examples/explorer.py                                   # the Quick start's model, outputs/stellar-pretrain
    python examples/explorer.py --model org/stellar-b16 --vq_tokenizer maskgit-vqgan --device cuda
    python examples/explorer.py --export_space space/ --hub_model_id org/stellar-b16   # a Hub Space folder

Upload an image (or pick a built-in sample): the page shows each sparse token's spatial map as a heat overlay, the
hard assignment of patches to tokens and the reconstruction from the factors. The edits (hand one token's area to
another, drop a token, swap a token with one of a second image, restrict a token to a drawn region) run the decoder
only, never the encoder, and the page shows the time each took. The figure and the factors (safetensors) download
from the page. The logic lives in `stellar_hf.explorer`; this file is the page and its command line.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

# Before gradio is imported: no usage statistics are sent, and nothing waits on the network.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from stellar_hf.explorer import (
    EDIT_KINDS,
    Edit,
    apply_edit,
    display_size,
    edit_figure,
    load_explorer,
    overlay_tiles,
    region_from_drawing,
    sample_images,
    save_factors,
    write_space,
)
from stellar_hf.visualization import to_pil_image

QUICK_START_MODEL = Path("outputs/stellar-pretrain")
DISPLAY_SIZE = 256  # pixels of the longer side of the pictures on the page (small models are enlarged)
EDIT_LABELS = {
    "reassign": "Hand token i's area to token j",
    "drop": "Drop token i (its patches renormalised over the others)",
    "swap": "Swap token i for token j of the second image",
    "restrict": "Restrict token i to the drawn region",
}
assert set(EDIT_LABELS) == set(EDIT_KINDS)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model",
        help=f"a STELLAR folder or Hub id with its decoder (default: {QUICK_START_MODEL}, the Quick start's output)",
    )
    parser.add_argument(
        "--vq_tokenizer",
        help="VQ models: the MaskGIT VQGAN folder or Hub id (default: the config's)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="'auto' (cuda, then mps, then cpu), or a torch device",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to serve on (0.0.0.0 to reach it from other machines)",
    )
    parser.add_argument(
        "--port", type=int, default=7860, help="port to serve on (0: a free one)"
    )
    parser.add_argument(
        "--share",
        action="store_true",
        help="also open a public gradio.live link (off by default)",
    )
    parser.add_argument(
        "--samples_dir",
        type=Path,
        help="a folder of images to offer as samples, next to the built-in ones",
    )
    parser.add_argument(
        "--num_synthetic_samples",
        type=int,
        default=6,
        help="built-in synthetic scenes to offer",
    )
    parser.add_argument(
        "--export_space",
        type=Path,
        metavar="DIR",
        help="write a Hub Space folder to DIR and exit",
    )
    parser.add_argument(
        "--hub_model_id", help="with --export_space: the Hub id the Space loads"
    )
    args = parser.parse_args(argv)
    if args.export_space is not None:
        if not args.hub_model_id:
            parser.error(
                "--export_space needs --hub_model_id: a Space loads its model from the Hub"
            )
        return args
    if args.hub_model_id:
        parser.error(
            "--hub_model_id goes with --export_space; to explore a Hub model locally pass it as --model"
        )
    if args.model is None:
        if not QUICK_START_MODEL.is_dir():
            parser.error(
                f"no --model given and {QUICK_START_MODEL} does not exist: run the Quick start first "
                "(python examples/pretrain.py), or pass --model with a STELLAR folder or Hub id"
            )
        args.model = str(QUICK_START_MODEL)
    if not 0 <= args.port < 65536:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    if args.num_synthetic_samples < 0:
        parser.error(
            f"--num_synthetic_samples must be 0 or more, got {args.num_synthetic_samples}"
        )
    if args.samples_dir is not None and not args.samples_dir.is_dir():
        parser.error(f"--samples_dir {args.samples_dir} is not a folder")
    return args


def import_gradio():
    try:
        import gradio
    except ModuleNotFoundError as error:
        if error.name != "gradio":
            raise
        raise SystemExit(
            'the explorer needs gradio: pip install -e ".[demo]"'
        ) from error
    return gradio


def launch_options() -> dict:
    """`demo.launch` arguments shared by the command line and a Space: no server-side rendering (no Node.js needed)."""
    return {"ssr_mode": False}


def build_demo(explorer, samples: dict | None = None):
    """The Gradio page (a `gr.Blocks`) on a `stellar_hf.explorer.StellarExplorer`; `samples` maps names to images."""
    gr = import_gradio()
    samples = dict(samples or {})
    config = explorer.config
    tokens = list(range(config.num_sparse_tokens))
    work_dir = Path(tempfile.mkdtemp(prefix="stellar-explorer-"))

    def shown(image) -> Image:  # noqa: F821 - a PIL image
        return display_size(to_pil_image(image), DISPLAY_SIZE)

    def gallery(factors):
        return [
            (display_size(picture, 192), caption)
            for picture, caption in overlay_tiles(factors)
        ]

    def write_downloads(session) -> tuple[str, str]:
        stem = work_dir / uuid.uuid4().hex[:12]
        figure = edit_figure(
            session["original"],
            session["edited"],
            session["original_image"],
            session["edited_image"],
        )
        figure_path = stem.with_name(stem.name + "-stellar-figure.png")
        figure.save(figure_path)
        factors_path = save_factors(
            stem.with_name(stem.name + "-stellar-factors.safetensors"),
            session["edited"],
            original=session["original"],
            model=explorer.name,
        )
        return str(figure_path), str(factors_path)

    def history(session) -> str:
        edits = session["edited"].edits
        if not edits:
            return "No edits yet: the edited decoding equals the original one."
        return "Edits, in order: " + "; ".join(
            f"{i + 1}. {edit.describe()}" for i, edit in enumerate(edits)
        )

    def on_image(image, session):
        if image is None:
            return None, [], None, None, None, "", "", None, None
        start = time.perf_counter()
        original = explorer.factorize(image)
        encoded = time.perf_counter() - start
        decoding = explorer.decode(original)
        session = {
            "original": original,
            "edited": original,
            "original_image": decoding.image,
            "edited_image": decoding.image,
            "other": (session or {}).get("other"),
        }
        figure_path, factors_path = write_downloads(session)
        region = {
            "background": np.asarray(shown(original.image)),
            "layers": [],
            "composite": None,
        }
        timing = (
            f"Encoded in {encoded:.3f} s (grid {original.grid_size[0]}x{original.grid_size[1]}, "
            f"{original.num_tokens} tokens); decoded in {decoding.seconds:.3f} s. Edits run the decoder only."
        )
        picture = shown(decoding.image)
        return (
            session,
            gallery(original),
            picture,
            picture,
            region,
            timing,
            history(session),
            figure_path,
            factors_path,
        )

    def on_second_image(image, session):
        session = dict(session or {})
        if image is None:
            session["other"] = None
            return session, "No second image: the swap edit needs one."
        session["other"] = explorer.factorize(image)
        return (
            session,
            f"Second image factorized: swap takes its tokens 0..{session['other'].num_tokens - 1}.",
        )

    def on_apply(kind, token, target, region, session):
        if not session or session.get("original") is None:
            raise gr.Error("Upload an image or pick a sample first.")
        start = time.perf_counter()
        edited = session["edited"]
        if kind == "restrict":
            drawing = None
            if region and region.get("layers"):
                drawing = np.asarray(region["layers"][0])
            if (
                drawing is None
                or not (
                    drawing[..., -1] > 0 if drawing.ndim == 3 else drawing > 0
                ).any()
            ):
                raise gr.Error(
                    "Draw the region over the image (the brush in the region editor) first."
                )
            mask = region_from_drawing(drawing, edited.grid_size)
            edit = Edit(
                "restrict",
                int(token),
                region=tuple(tuple(bool(v) for v in row) for row in mask),
            )
        else:
            edit = Edit(
                kind, int(token), target=None if kind == "drop" else int(target)
            )
        try:
            edited = apply_edit(edited, edit, other=session.get("other"))
        except ValueError as error:
            raise gr.Error(str(error)) from error
        edit_seconds = time.perf_counter() - start
        decoding = explorer.decode(edited)
        session = {**session, "edited": edited, "edited_image": decoding.image}
        figure_path, factors_path = write_downloads(session)
        tiles = gallery(edited)
        total = time.perf_counter() - start
        timing = (
            f"Edit: decoder {decoding.seconds:.3f} s (the edit itself {edit_seconds * 1000:.1f} ms; "
            f"with the pictures and files {total:.3f} s). The encoder did not run: "
            f"{explorer.encoder_calls} encoder passes since the page started, one per image."
        )
        return (
            session,
            tiles,
            shown(decoding.image),
            timing,
            history(session),
            figure_path,
            factors_path,
        )

    def on_reset(session):
        if not session or session.get("original") is None:
            return session, [], None, "", ""
        session = {
            **session,
            "edited": session["original"],
            "edited_image": session["original_image"],
        }
        return (
            session,
            gallery(session["original"]),
            shown(session["original_image"]),
            "Edits reset.",
            history(session),
        )

    def pick_sample(name):
        if not name:
            return gr.update()
        sample = samples[name]
        return (
            to_pil_image(sample) if not isinstance(sample, (str, Path)) else str(sample)
        )

    with gr.Blocks(title="STELLAR explorer", analytics_enabled=False) as demo:
        session = gr.State(None)
        gr.Markdown(
            f"# STELLAR explorer\n`{explorer.name}`: {config.num_sparse_tokens} sparse tokens, "
            f"{config.patch_size}-px patches, {config.image_size}-px input, "
            f"{'VQGAN codes' if config.reconstruction_target == 'vq' else 'pixel'} decoder, on {explorer.device}. "
            "Upload an image or pick a sample; edit the factors below and the edited image is decoded at once."
        )
        with gr.Row():

            def image_source(label: str, image_id: str, sample_id: str):
                """An upload box and, under it, the built-in samples: (image, sample dropdown)."""
                uploaded = gr.Image(
                    type="pil", label=label, sources=["upload", "clipboard"], height=DISPLAY_SIZE, elem_id=image_id
                )
                return uploaded, gr.Dropdown(choices=list(samples), value=None, label="or a sample", elem_id=sample_id)

            with gr.Column():
                image, sample = image_source("Image", "input-image", "sample")
            with gr.Column():
                second_image, second_sample = image_source("Second image (for swaps)", "second-image", "second-sample")
                second_status = gr.Markdown("No second image: the swap edit needs one.")
        overlays = gr.Gallery(
            label="The image, the hard assignment (a colour per token) and each token's spatial map (mass share)",
            columns=min(6, 2 + len(tokens)),
            height="auto",
            format="png",
            elem_id="overlays",
        )
        with gr.Row():
            with gr.Column():
                kind = gr.Radio(
                    choices=[(EDIT_LABELS[k], k) for k in EDIT_KINDS],
                    value="drop",
                    label="Edit",
                    elem_id="edit-kind",
                )
                with gr.Row():
                    token = gr.Dropdown(
                        choices=tokens, value=0, label="token i", elem_id="token"
                    )
                    target = gr.Dropdown(
                        choices=tokens,
                        value=min(1, tokens[-1]),
                        label="token j",
                        elem_id="target",
                    )
                with gr.Row():
                    apply = gr.Button(
                        "Apply edit", variant="primary", elem_id="apply-edit"
                    )
                    reset = gr.Button("Reset edits", elem_id="reset-edits")
            region = gr.ImageEditor(
                label="Region for 'restrict' (paint over the image)",
                type="numpy",
                image_mode="RGBA",
                sources=[],
                transforms=[],
                layers=False,
                canvas_size=(DISPLAY_SIZE, DISPLAY_SIZE),
                fixed_canvas=True,
                brush=gr.Brush(colors=["#ff3030"], color_mode="fixed", default_size=16),
                height=DISPLAY_SIZE + 80,
                elem_id="region",
            )
        with gr.Row():
            original_decoding = gr.Image(
                label="Decoded from the original factors",
                format="png",
                interactive=False,
                elem_id="original-decoding",
            )
            edited_decoding = gr.Image(
                label="Decoded from the edited factors",
                format="png",
                interactive=False,
                elem_id="edited-decoding",
            )
        latency = gr.Markdown(elem_id="edit-latency")
        edits = gr.Markdown(elem_id="edit-history")
        with gr.Row():
            figure_file = gr.File(label="Figure (PNG)", elem_id="figure-file")
            factors_file = gr.File(
                label="Factors (safetensors)", elem_id="factors-file"
            )

        image.change(
            on_image,
            [image, session],
            [
                session,
                overlays,
                original_decoding,
                edited_decoding,
                region,
                latency,
                edits,
                figure_file,
                factors_file,
            ],
        )
        sample.change(pick_sample, sample, image)
        second_image.change(
            on_second_image, [second_image, session], [session, second_status]
        )
        second_sample.change(pick_sample, second_sample, second_image)
        apply.click(
            on_apply,
            [kind, token, target, region, session],
            [
                session,
                overlays,
                edited_decoding,
                latency,
                edits,
                figure_file,
                factors_file,
            ],
        )
        reset.click(
            on_reset, session, [session, overlays, edited_decoding, latency, edits]
        )
    return demo


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.export_space is not None:
        folder = write_space(
            args.export_space,
            args.hub_model_id,
            Path(__file__),
            vq_tokenizer=args.vq_tokenizer,
        )
        print(
            f"wrote a Space for {args.hub_model_id} to {folder}; publish it with "
            f"`hf upload <user>/<space> {folder} --repo-type space`"
        )
        return 0
    import_gradio()  # fail before loading the model

    from stellar_hf.devices import resolve_device

    try:
        explorer = load_explorer(
            args.model,
            vq_tokenizer=args.vq_tokenizer,
            device=resolve_device(args.device),
        )
    except (OSError, ValueError) as error:
        raise SystemExit(f"cannot load {args.model}: {error}") from error
    image_size = max(explorer.config.image_size, 128)
    samples = sample_images(args.num_synthetic_samples, image_size, args.samples_dir)
    demo = build_demo(explorer, samples)
    demo.queue().launch(
        server_name=args.host,
        server_port=args.port or None,
        share=args.share,
        **launch_options(),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
