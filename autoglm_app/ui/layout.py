"""The AutoGLM Studio page: chat on the left, Focus | Routing | Model | Export tabs on the right.

``build_ui(engine, settings)`` lays the page out top to bottom as it looks, then wires its events to
the handlers (``handlers.py``); ``mount_ui`` mounts it at "/" of the server's FastAPI app.

Named API endpoints (gradio_client): ``/chat`` (text, images, audio, settings -> history), ``/stop``,
``/regenerate``, ``/clear``, ``/export``; ``/send`` is the page's own multimodal-box endpoint;
``/transcribe`` exists for a model that does not hear but has a speech-to-text model (recording ->
editable text in the box).

What the engine can do (``panels.Capabilities``): without focus or routing (a remote backend) those
panels say they need the in-process engine and the Model panel shows the backend and base URL; a
model that does not hear but can transcribe puts a recording's transcript in the text box for
editing, and the turn then sends that text (the recording stays in the history, not sent as audio).
"""

from __future__ import annotations

import json

import gradio as gr

from ..config import Settings
from . import render
from .handlers import Handlers
from .inputs import EXAMPLES_DIR, SLIDERS, chat_example, example_caption, load_examples
from .panels import (WORDS_PLACEHOLDER, Capabilities, Page, focus_placeholder, mic_label, model_panel,
                     routing_placeholder)
from .session import CONTEXT_MODES, PANELS_EVERY_S, Session
from .trace_import import IMPORT_HELP, TraceImporter

EXPORT_HELP = ("**QA trace.** Download the whole conversation as a zip: `trace.json` with the prompts, reasoning, "
               "answers, settings, model id, speed, per-token focus maps and expert routing, plus the input images, "
               "the recording, and a heatmap PNG for every word of each reply.")

CSS = """
.gradio-container {max-width: 100% !important; padding-top: 6px !important;}
#title h2 {margin: 0;}
#title p {margin: 0; color: var(--body-text-color-subdued);}
.placeholder {color: var(--body-text-color-subdued); padding: 18px; border: 1px dashed var(--border-color-primary);
              border-radius: 8px; text-align: center; line-height: 1.5;}
.caption {padding: 4px 2px;}
.routing {overflow-x: auto; margin-bottom: 8px;}
.routing table {border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums;}
.routing table.heat {min-width: 60%;}
.routing caption {caption-side: top; text-align: left; font-size: 12px; padding: 4px 0;
                  color: var(--body-text-color-subdued);}
.routing th, .routing td {padding: 5px 10px; border: 1px solid var(--border-color-primary); text-align: center;}
.routing td.fig {color: var(--body-text-color-subdued);}
.routing td.chosen {outline: 3px solid #f97316; outline-offset: -3px; font-weight: 700;}
.routing td.chosen sup {font-weight: 400; margin-left: 2px;}
.routing td.bar {width: 240px; text-align: left; white-space: nowrap;}
.routing td.bar span {display: inline-block; height: 12px; vertical-align: middle;}
.routing .key {display: inline-block; width: 10px; height: 10px; margin: 0 3px 0 8px; border-radius: 2px;}
.routing .gate {display: inline-block; margin-right: 12px; white-space: nowrap;}
.routing .gate i {display: inline-block; height: 8px; background: #6366f1; margin: 0 4px; vertical-align: middle;}
#words {max-height: 340px; overflow-y: auto;}
.compare-side {padding: 6px 8px; border: 1px solid var(--border-color-primary); border-radius: 8px;}
.compare-reply {white-space: pre-wrap; font-size: 14px; margin-top: 4px;}
.compare-diverged {background: #fed7aa;}
.compare-reasoning {color: var(--body-text-color-subdued); font-style: italic;}
.routing tr.compare-disagree td {background: #fee2e2;}
#compare-words {max-height: 340px; overflow-y: auto;}
.chip {display: inline-block; padding: 0 6px; border-radius: 4px; margin: 0 2px;}
#alternatives table {border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums;}
#alternatives th, #alternatives td {padding: 4px 8px; border: 1px solid var(--border-color-primary);
                                    text-align: left; vertical-align: top;}
#alternatives td.emitted {outline: 2px solid #f97316; outline-offset: -2px;}
#alternatives .bar {height: 4px; background: #6366f1; margin-top: 2px;}
"""

THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="orange")


def settings_check_js(bounds: list[tuple[int, str, float, float, str]], typed_at: int) -> str:
    """The Send / Regenerate / edit events' browser-side step: a value typed into a slider's box outside its
    range (the slider itself has already clamped it, so the box is read) is reported in the hidden
    ``typed`` input (the handler then warns and sends nothing) and the value sent stays within the range,
    so Gradio's own range check never turns it into an error on every panel."""
    return ("(...args) => { const bounds = " + json.dumps(bounds) + "; const bad = {};"
            " for (const [i, label, lo, hi, id] of bounds) {"
            " const box = document.querySelector('#' + id + ' input[type=number]');"
            " const typed = (window.__autoglmTyped || {})[id];"
            " const raw = typed !== undefined ? typed : (box && box.value !== '' ? box.value : args[i]);"
            " const v = Number(raw);"
            " if (!Number.isFinite(v) || v < lo || v > hi) { bad[label] = raw;"
            " args[i] = Math.min(Math.max(Number.isFinite(Number(args[i])) ? Number(args[i]) : lo, lo), hi); } }"
            " window.__autoglmTyped = {};"
            f" args[{typed_at}] = Object.keys(bad).length ? JSON.stringify(bad) : ''; return args; }}")


# Installed on page load: what the user last typed into a slider's number box, before the slider clamps it
# on blur (Gradio sets box and slider to the bound silently); dragging the slider forgets it. The Send
# step (settings_check_js) reads it, so "temperature 9" is a warning, not a silent 2.0.
TYPED_VALUES_JS = """(...args) => {
  if (!window.__autoglmTypedInstalled) {
    window.__autoglmTypedInstalled = true; window.__autoglmTyped = {};
    document.addEventListener('input', (e) => {
      const el = e.target; if (!(el instanceof HTMLInputElement)) return;
      const host = el.closest('[id]'); if (!host) return;
      if (el.type === 'number') window.__autoglmTyped[host.id] = el.value;
      else if (el.type === 'range') delete window.__autoglmTyped[host.id];
    }, true);
  }
  return args;
}"""


def build_page(engine, settings: Settings, compare=None) -> tuple[gr.Blocks, Handlers]:
    """The page as Blocks (not yet mounted), and the handlers its events call. ``compare``: compare mode's second
    engine (a Compare tab, ui/compare.py; nothing of it without one)."""
    caps = Capabilities.of(engine)
    if compare is not None:
        from .compare import CompareView

        compare_view = CompareView(engine, compare)
    else:
        compare_view = None
    info, examples = caps.info, load_examples()
    limit = int(info.get("context_limit") or 8192)
    focus_shown = caps.focus  # without focus (remote backend) its controls have nothing to act on
    watch = "watch its reasoning, where it looked, and which experts it used" if caps.focus else "watch its reasoning"
    domain = f"  \n**Knows:** {caps.domain}" if caps.domain else ""
    defaults = {"temperature": 0.7, "top-p": 0.9, "max-tokens": 512, "top-k": 0, "repetition-penalty": 1.0}
    steps = {"temperature": 0.05, "top-p": 0.05, "max-tokens": 1, "top-k": 1, "repetition-penalty": 0.05}

    with gr.Blocks(title="AutoGLM Studio") as demo:
        state = gr.State(Session(multi_turn=caps.multi_turn))  # deep-copied for each browser session
        browser_key = gr.BrowserState("", storage_key="autoglm-studio-session")
        gr.Markdown(f"## AutoGLM Studio\n`{info.get('model_id', 'model')}` · ask about an image or a "
                    f"recording; {watch}.{domain}", elem_id="title")
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=420):  # ---------------------------------------- chat
                chatbot = gr.Chatbot(
                    label="Chat", height="calc(100vh - 330px)", min_height=320, elem_id="chat",
                    placeholder="**Ask AutoGLM about a picture or a recording.** Attach or paste images, record a "
                                "question with the microphone, or start with an example:",
                    examples=[chat_example(ex) for ex in examples], buttons=["copy"], feedback_options=None,
                    editable="user", group_consecutive_messages=False)
                prompt = gr.MultimodalTextbox(
                    placeholder="Type a question; attach or paste images (several per turn are fine)…",
                    file_types=["image", "audio"], file_count="multiple", sources=["upload"],
                    submit_btn=False, show_label=False, elem_id="prompt")
                with gr.Row(equal_height=True):
                    mic = gr.Audio(sources=["microphone", "upload"], type="filepath", label=mic_label(caps),
                                   scale=3, elem_id="mic")
                    with gr.Column(scale=2, min_width=200):
                        with gr.Row():
                            send_btn = gr.Button("Send", variant="primary", min_width=80, elem_id="send")
                            stop_btn = gr.Button("Stop", variant="stop", min_width=80, elem_id="stop")
                        with gr.Row():
                            regen_btn = gr.Button("Regenerate", min_width=80, elem_id="regenerate")
                            clear_btn = gr.Button("New chat", min_width=80, elem_id="clear")
                        transcribe_btn = gr.Button("Transcribe", min_width=80, visible=caps.transcribing,
                                                   elem_id="transcribe")
                with gr.Accordion("Generation settings", open=False, elem_id="settings"):
                    with gr.Row():
                        context_mode = gr.Radio(
                            list(CONTEXT_MODES), value=CONTEXT_MODES[int(caps.multi_turn)], label="Conversation",
                            info=("this model was trained on single questions: each turn alone" if not caps.multi_turn
                                  else "multi-turn sends the earlier turns with each question"),
                            elem_id="context-mode")
                        thinking = gr.Checkbox(value=True, label="Thinking (reasoning before the answer)",
                                               elem_id="thinking")
                        seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)", elem_id="seed")
                    system = gr.Textbox(label="System prompt", lines=2, max_lines=8, elem_id="system-prompt",
                                        placeholder="Optional: instructions sent before the conversation")
                    sliders = []
                    for row in (SLIDERS[:3], SLIDERS[3:]):
                        with gr.Row():
                            for elem, label, lo, hi in row:
                                hi = min(limit, 4096) if hi is None else hi
                                sliders.append(gr.Slider(lo, hi, value=defaults[elem], step=steps[elem], label=label,
                                                         elem_id=elem))
                    stop = gr.Textbox(label="Stop sequences (one per line)", lines=1, max_lines=4,
                                      elem_id="stop-sequences")
                    temperature, top_p, max_new_tokens, top_k, repetition_penalty = sliders
                    typed = gr.Textbox(visible=False)
                example_set = gr.Dataset(label="Examples: click one to start a new chat with it",
                                         components=["textbox"], samples=[[example_caption(ex)] for ex in examples],
                                         type="index", samples_per_page=8, elem_id="examples")
            with gr.Column(scale=6, min_width=480), gr.Tabs(elem_id="panel-tabs") as tabs:  # ------- panels
                with gr.Tab("Focus", id="focus", elem_id="tab-focus"):
                    focus_caption = gr.HTML(focus_placeholder(caps), elem_id="focus-caption")
                    with gr.Row(equal_height=False, visible=focus_shown or caps.routing):
                        turn_pick = gr.Dropdown([("latest", -1)], value=-1, label="Turn", min_width=140,
                                                elem_id="turn-pick")
                        version_pick = gr.Dropdown([], label="Versions", visible=False, min_width=140,
                                                   elem_id="version-pick")
                        image_pick = gr.Radio([], label="Image", visible=False, min_width=140, elem_id="image-pick")
                        colormap = gr.Dropdown(list(render.COLORMAPS), value="inferno", label="Colour map",
                                               min_width=120, visible=focus_shown)
                        opacity = gr.Slider(0.0, 1.0, value=0.55, step=0.05, label="Opacity", min_width=140,
                                            visible=focus_shown)
                    with gr.Row(equal_height=False):
                        focus_image = gr.Image(type="pil", format="jpeg", label="Focus heatmap", visible=False,
                                               interactive=False, height="40vh", buttons=["download", "fullscreen"],
                                               scale=3, min_width=240, elem_id="focus-image")
                        words = gr.HighlightedText(WORDS_PLACEHOLDER, label="Reply word by word: click a word",
                                                   color_map=render.WORD_COLORS, show_legend=False,
                                                   show_inline_category=False, interactive=False, scale=2,
                                                   min_width=200, visible=focus_shown, elem_id="words")
                    with gr.Row(equal_height=False):
                        probabilities = gr.Checkbox(False, label="Colour words by probability",
                                                    info="how sure the model was of each word", min_width=200,
                                                    elem_id="colour-probs")
                        prob_legend = gr.HTML("", elem_id="probability-legend")
                    alternatives = gr.HTML("", elem_id="alternatives")
                    with gr.Row(equal_height=True):
                        alt_pick = gr.Radio([], label="Continue from an alternative", visible=False, scale=4,
                                            elem_id="alternative-pick")
                        branch_btn = gr.Button("Continue from it (new version)", visible=False, scale=1,
                                               min_width=160, elem_id="branch")
                    audio_pick = gr.Radio([], label="Recording", visible=False, elem_id="audio-pick")
                    audio_focus = gr.Image(type="pil", format="png", label="Focus over the recording", visible=False,
                                           interactive=False, height=190, buttons=["download"], elem_id="audio-focus")
                    with gr.Accordion("Layers: aggregate the focus maps again", open=False, visible=focus_shown):
                        with gr.Row(equal_height=False):
                            aggregation = gr.Radio(list(render.AGGREGATIONS), value="default", label="Aggregation",
                                                   info="default = the model's own choice; mean / max use the range",
                                                   elem_id="aggregation")
                            layer_from = gr.Slider(0, 1, value=0, step=1, label="from layer", elem_id="layer-from")
                            layer_to = gr.Slider(1, 2, value=2, step=1, label="to layer (exclusive)",
                                                 elem_id="layer-to")
                with gr.Tab("Routing", id="routing", elem_id="tab-routing"):
                    load_view = gr.Radio(list(render.LOAD_VIEWS), value="total", label="Expert load",
                                         info="all tokens, prompt (prefill) or generated (decode) tokens, or by the "
                                              "modality of the token", visible=caps.routing, elem_id="load-view")
                    routing_html = gr.HTML(routing_placeholder(caps), elem_id="routing")
                    routing_plot = gr.Plot(label="Expert load: layers x experts (hover for values, drag to zoom)",
                                           visible=False, elem_id="routing-figure")
                    with gr.Accordion("Look closer: a range of layers and experts", open=False,
                                      visible=caps.routing, elem_id="routing-range"):
                        with gr.Row():
                            route_layer_from = gr.Slider(0, 1, value=0, step=1, label="from MoE layer",
                                                         elem_id="route-layer-from")
                            route_layer_to = gr.Slider(1, 2, value=2, step=1, label="to MoE layer (exclusive)",
                                                       elem_id="route-layer-to")
                            expert_from = gr.Slider(0, 1, value=0, step=1, label="from expert", elem_id="expert-from")
                            expert_to = gr.Slider(1, 2, value=2, step=1, label="to expert (exclusive)",
                                                  elem_id="expert-to")
                    with gr.Row(equal_height=False):
                        token_html = gr.HTML("", elem_id="token-routes")
                        balance_plot = gr.Plot(label="Balance per layer", visible=False, elem_id="balance-figure")
                    split_html = gr.Plot(label="Tokens per expert by modality", visible=False,
                                         elem_id="modality-split")
                with gr.Tab("Model", id="model", elem_id="tab-model"):
                    model_md = gr.Markdown(model_panel(caps, Session()), elem_id="model-panel")
                    refresh_btn = gr.Button("Refresh memory figures", size="sm", visible=not caps.remote)
                if compare_view is not None:  # compare mode: B's answer beside A's, the metrics (ui/compare.py)
                    compare_view.layout(state)
                with gr.Tab("Export", id="export", elem_id="tab-export"):
                    gr.Markdown(EXPORT_HELP)
                    export_btn = gr.Button("Build QA trace (.zip)", variant="primary", elem_id="export")
                    export_file = gr.File(label="QA trace", visible=False, elem_id="export-file")
                    gr.Markdown(IMPORT_HELP)
                    import_btn = gr.UploadButton("Import a QA trace (.zip)", file_types=[".zip"], type="filepath",
                                                 elem_id="import-trace")
                    import_status = gr.Markdown("", elem_id="import-status")
        with gr.Column(visible=False):  # the clean /chat API endpoint takes plain inputs; no place on the page
            api_text = gr.Textbox(label="text")
            api_images = gr.File(label="images", file_count="multiple", file_types=["image"])
            api_audio = gr.Audio(label="audio", type="filepath")
            api_btn = gr.Button("chat")
            api_send_btn, api_regen_btn = gr.Button("send"), gr.Button("regenerate")
        # the shown tab's panels while a reply streams (ui/live.py)
        timer, routing_timer = gr.Timer(PANELS_EVERY_S, active=False), gr.Timer(PANELS_EVERY_S, active=False)

        # ------------------------------------------------------------------------------------ wiring
        page = Page(chatbot, prompt, mic, turn_pick, version_pick, focus_caption, image_pick, focus_image, words,
                    audio_pick, audio_focus, layer_from, layer_to, routing_html, routing_plot, balance_plot, token_html,
                    split_html, model_md, export_file, settings=sliders, state=state, browser_key=browser_key,
                    context_mode=context_mode, timer=timer, routing_timer=routing_timer,
                    route_sliders=(route_layer_from, route_layer_to, expert_from, expert_to),
                    alternatives=(prob_legend, alternatives, alt_pick, branch_btn))
        h = Handlers(engine, settings, caps, page, examples)
        review = TraceImporter(h, import_status)
        review.protect(h)  # an imported trace is read-only: its handlers refuse a new turn (ui/trace_import.py)
        options = [thinking, temperature, top_p, max_new_tokens, seed, top_k, repetition_penalty, stop, system,
                   context_mode, typed]
        turn_outputs, panel_outputs = page.turn_outputs(), page.panel_outputs()
        first_option = 2  # send's inputs: prompt, mic, then the options

        def checked(offset: int) -> str:
            bounds = [(offset + options.index(c), c.label, c.minimum, c.maximum, c.elem_id) for c in sliders]
            return settings_check_js(bounds, offset + options.index(typed))

        # the page's turns: start -> stream (the chat only) -> finish, the panels on the timer (ui/live.py)
        live = turn_outputs + [timer, routing_timer]

        def streamed(event):
            if compare_view is not None:  # the same turn to B, beside the chat's own stream
                compare_view.follow(event, state)
            return event.then(h.stream_chat, [state], [chatbot], api_visibility="private", concurrency_limit=None,
                              show_progress="hidden").then(h.finish, [state], live, api_visibility="private",
                                                           show_progress="hidden")

        start = dict(fn=h.send_page, inputs=[prompt, mic, *options, state], outputs=live, concurrency_limit=None,
                     js=checked(first_option), api_visibility="private")  # the engine queues fairly
        streamed(send_btn.click(**start))
        streamed(prompt.submit(**start))
        streamed(regen_btn.click(h.regenerate_page, [*options, state], live, api_visibility="private",
                                 concurrency_limit=None, js=checked(0)))
        streamed(chatbot.edit(h.edit_page, [*options, state], live, api_visibility="private", concurrency_limit=None,
                              js=checked(0)))
        timer.tick(h.tick_focus, [state], page.focus_outputs(), api_visibility="private", show_progress="hidden",
                   concurrency_limit=None)
        routing_timer.tick(h.tick_routing, [state], page.routing_outputs(), api_visibility="private",
                           show_progress="hidden", concurrency_limit=None)
        tabs.select(h.pick_tab, [state], [timer, routing_timer, *panel_outputs], api_visibility="private",
                    show_progress="hidden")
        stop_btn.click(h.stop, [state], None, api_name="stop", concurrency_limit=None)
        clear_outputs = turn_outputs + [export_file, import_status]
        clear_btn.click(h.clear, [state], clear_outputs, api_name="clear")
        chatbot.clear(h.clear, [state], clear_outputs, api_visibility="private")
        streamed(example_set.click(h.start_example, [example_set, state], clear_outputs,
                                   api_visibility="private").success(**start))
        streamed(chatbot.example_select(h.pick_chat_example, [state], clear_outputs,
                                        api_visibility="private").success(**start))
        # the named endpoints for gradio_client: one streaming event each (Handlers._run)
        api_send_btn.click(h.send, [prompt, mic, *options, state], turn_outputs, api_name="send",
                           concurrency_limit=None)
        api_regen_btn.click(h.regenerate, [*options, state], turn_outputs, api_name="regenerate",
                            concurrency_limit=None)
        version_pick.input(h.choose_version, [version_pick, state],
                           [chatbot, turn_pick, *panel_outputs, model_md], api_visibility="private")

        words.select(h.select_word, [state], panel_outputs, api_visibility="private")
        probabilities.input(h.colour_by_probability, [probabilities, state], panel_outputs, api_visibility="private")
        streamed(branch_btn.click(h.branch_page, [alt_pick, *options, state], live, api_visibility="private",
                                  concurrency_limit=None, js=checked(1)))
        view = [turn_pick, image_pick, audio_pick, colormap, opacity, aggregation, layer_from, layer_to, load_view,
                route_layer_from, route_layer_to, expert_from, expert_to]
        for control in view:
            control.input(h.change_view, [*view, state], panel_outputs, api_visibility="private")

        if caps.transcribing:  # a model that does not hear: recording -> editable text in the box
            transcribe = dict(fn=h.transcribe, inputs=[prompt, mic, state], outputs=[prompt])
            transcribe_btn.click(**transcribe, api_name="transcribe")
            mic.stop_recording(**transcribe, api_visibility="private")
            mic.upload(**transcribe, api_visibility="private")

        refresh_btn.click(h.model, [state], [model_md], api_visibility="private")
        demo.load(h.restore, [browser_key, state],
                  [state, browser_key, chatbot, turn_pick, *panel_outputs, model_md, context_mode, import_status],
                  api_visibility="private", js=TYPED_VALUES_JS)
        export_btn.click(h.export, [state], [export_file], api_name="export")
        import_btn.upload(review.load, [import_btn, state], review.outputs(), api_name="import_trace")
        api_btn.click(h.api_chat, [api_text, api_images, api_audio, thinking, temperature, top_p, max_new_tokens, seed,
                                   state], [chatbot], api_name="chat", concurrency_limit=None)
    return demo, h


def build_ui(engine, settings: Settings, compare=None) -> gr.Blocks:
    """The page as Blocks (not yet mounted)."""
    return build_page(engine, settings, compare)[0]


def mount_ui(app, engine, settings: Settings, compare=None):
    """Mount the page at "/" of the FastAPI ``app``; returns the app. ``compare``: compare mode's second engine."""
    blocks = build_ui(engine, settings, compare)
    # Gradio refuses an upload over its cap in the browser and the question is then sent without the file;
    # the page's own limit (--max-upload-mb) is checked at Send instead (a warning, nothing sent, the inputs
    # kept), so Gradio's cap sits well above it and only stops uploads no limit setting would accept.
    upload_cap = max(4 * settings.limits.max_upload_bytes, settings.limits.max_upload_bytes + 32 * 2**20)
    blocks.queue(default_concurrency_limit=4)
    return gr.mount_gradio_app(app, blocks, path="/", theme=THEME, css=CSS, allowed_paths=[str(EXAMPLES_DIR)],
                               footer_links=["api"], show_error=True, max_file_size=upload_cap)
