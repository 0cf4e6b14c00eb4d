// lungcad's image viewer: a Cornerstone3D stack viewport over the pixel data the server sends (HU for
// DICOM CT, grey levels for JPG/PNG), with window/level presets and dragging, zoom, pan, scrolling
// through the frames (wheel, arrow keys, PageUp/PageDown) and the Grad-CAM heatmap at the image's own
// rows and columns, coloured here with one colour map that the legend also draws, under an opacity slider.
//
// The template (templates/_viewer.html) describes the frames in a JSON block:
//   {"frames": [{"pixels": URL, "heatmap": URL, "label": "..."}], "presets": [{"key", "name", "level",
//    "width"}], "initial": key, "unit": "HU" | "grey"}
// Pixels and heatmaps are .npy arrays (lungcad.web.viewer); the server decodes DICOM (pydicom and its
// codecs), so the browser needs no DICOM parser, codec, web worker or WASM.
import {
  Enums,
  RenderingEngine,
  imageLoader,
  init as coreInit,
  utilities,
} from "@cornerstonejs/core";
import {
  Enums as ToolEnums,
  PanTool,
  StackScrollTool,
  ToolGroupManager,
  WindowLevelTool,
  ZoomTool,
  addTool,
  init as toolsInit,
} from "@cornerstonejs/tools";

const SCHEME = "lungcad";
const DTYPES = { "|u1": Uint8Array, "<u1": Uint8Array, "<i2": Int16Array, "<u2": Uint16Array, "<f4": Float32Array };

// ------------------------------------------------------------------------------------------ .npy

/** Parse a NumPy .npy (version 1-3, C order, little endian) into {data: TypedArray, shape: [..]}. */
export function parseNpy(buffer) {
  const bytes = new Uint8Array(buffer);
  const magic = [0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59]; // \x93NUMPY
  if (bytes.length < 10 || magic.some((b, i) => bytes[i] !== b)) throw new Error("not a .npy array");
  const view = new DataView(buffer);
  const major = bytes[6];
  const headerLength = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const start = major === 1 ? 10 : 12;
  const header = new TextDecoder("latin1").decode(bytes.subarray(start, start + headerLength));
  const descr = /'descr':\s*'([^']+)'/.exec(header);
  const shape = /'shape':\s*\(([^)]*)\)/.exec(header);
  if (!descr || !shape || /'fortran_order':\s*True/.test(header)) throw new Error("unsupported .npy header");
  const Type = DTYPES[descr[1]];
  if (!Type) throw new Error(`unsupported .npy dtype ${descr[1]}`);
  const dims = shape[1].split(",").map((s) => s.trim()).filter(Boolean).map(Number);
  const count = dims.reduce((a, b) => a * b, 1);
  const offset = start + headerLength;
  // Typed arrays need an aligned offset: NumPy pads the header to 64 bytes, but copy if it is not.
  const data = offset % Type.BYTES_PER_ELEMENT === 0
    ? new Type(buffer, offset, count)
    : new Type(buffer.slice(offset, offset + count * Type.BYTES_PER_ELEMENT));
  return { data, shape: dims };
}

async function fetchNpy(url) {
  const response = await fetch(url, { credentials: "same-origin" });
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  // X-Lungcad-Unit: "HU" (DICOM CT), "value" (other DICOM), "grey" (JPG/PNG): see lungcad.web.viewer
  return { ...parseNpy(await response.arrayBuffer()), unit: response.headers.get("X-Lungcad-Unit") || "grey" };
}

// ---------------------------------------------------------------------------------- image loader

// imageId = "lungcad:<pixels URL>". The image is a plain greyscale image at 1 unit per pixel, origin 0:
// world (x, y) = (column, row), which is how the heatmap overlay finds its place on screen.
function loadLungcadImage(imageId) {
  const url = imageId.slice(SCHEME.length + 1);
  const promise = fetchNpy(url).then(({ data, shape, unit }) => {
    if (shape.length !== 2) throw new Error(`${url}: expected a 2-D array, got shape (${shape})`);
    const [rows, columns] = shape;
    let min = Infinity;
    let max = -Infinity;
    for (let i = 0; i < data.length; i++) {
      const v = data[i];
      if (v < min) min = v;
      if (v > max) max = v;
    }
    const plane = {
      rows, columns, frameOfReferenceUID: "lungcad", imageOrientationPatient: [1, 0, 0, 0, 1, 0],
      rowCosines: [1, 0, 0], columnCosines: [0, 1, 0], imagePositionPatient: [0, 0, 0],
      pixelSpacing: [1, 1], rowPixelSpacing: 1, columnPixelSpacing: 1,
    };
    const bits = data.BYTES_PER_ELEMENT * 8;
    const pixel = {
      samplesPerPixel: 1, photometricInterpretation: "MONOCHROME2", rows, columns,
      bitsAllocated: bits, bitsStored: bits, highBit: bits - 1, pixelRepresentation: data instanceof Int16Array ? 1 : 0,
    };
    utilities.genericMetadataProvider.add(imageId, { type: "imagePlaneModule", metadata: plane });
    utilities.genericMetadataProvider.add(imageId, { type: "imagePixelModule", metadata: pixel });
    // Cornerstone's rendering reads the modality (OT: "other", a JPG/PNG or non-CT DICOM without HU)
    const modality = unit === "HU" ? "CT" : "OT";
    utilities.genericMetadataProvider.add(imageId, { type: "generalSeriesModule", metadata: { modality } });
    const voxelManager = utilities.VoxelManager.createImageVoxelManager({
      height: rows, width: columns, numberOfComponents: 1, scalarData: data, id: imageId,
    });
    return {
      imageId, rows, columns, height: rows, width: columns, color: false, rgba: false, numberOfComponents: 1,
      dataType: data.constructor.name, slope: 1, intercept: 0, invert: false,
      minPixelValue: min, maxPixelValue: max, windowCenter: (min + max) / 2, windowWidth: Math.max(1, max - min),
      columnPixelSpacing: 1, rowPixelSpacing: 1, FrameOfReferenceUID: "lungcad", sizeInBytes: data.byteLength,
      getPixelData: () => voxelManager.getScalarData(), getCanvas: undefined, voxelManager,
    };
  });
  return { promise };
}

// ------------------------------------------------------------------------------------ colour map

// The heatmap's colour scale: the "jet" map of lungcad predict --cam and the DICOM Secondary Captures
// (pytorch-grad-cam / OpenCV COLORMAP_JET), so a clinician sees the same colours everywhere.
export function jet(t) {
  const c = (x) => Math.round(255 * Math.min(1, Math.max(0, x)));
  return [c(1.5 - Math.abs(4 * t - 3)), c(1.5 - Math.abs(4 * t - 2)), c(1.5 - Math.abs(4 * t - 1))];
}
const LUT = Array.from({ length: 256 }, (_, i) => jet(i / 255));

function drawLegend(canvas) {
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  for (let x = 0; x < width; x++) {
    const [r, g, b] = LUT[Math.round((x / (width - 1)) * 255)];
    ctx.fillStyle = `rgb(${r},${g},${b})`;
    ctx.fillRect(x, 0, 1, height);
  }
}

/** The heatmap (uint8, 0-255 = Grad-CAM 0-1) as an RGBA canvas; 0 (where the model never looked) is transparent. */
function heatmapCanvas({ data, shape }) {
  const [rows, columns] = shape;
  const canvas = document.createElement("canvas");
  canvas.width = columns;
  canvas.height = rows;
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(columns, rows);
  for (let i = 0; i < data.length; i++) {
    const v = data[i];
    const [r, g, b] = LUT[v];
    img.data[4 * i] = r;
    img.data[4 * i + 1] = g;
    img.data[4 * i + 2] = b;
    img.data[4 * i + 3] = v === 0 ? 0 : 255;
  }
  ctx.putImageData(img, 0, 0);
  return canvas;
}

// ---------------------------------------------------------------------------------------- viewer

let initialised = null;
function initialise() {
  if (!initialised) {
    initialised = (async () => {
      await coreInit();
      toolsInit();
      imageLoader.registerImageLoader(SCHEME, loadLungcadImage);
      for (const tool of [WindowLevelTool, PanTool, ZoomTool, StackScrollTool]) addTool(tool);
    })();
  }
  return initialised;
}

let counter = 0;

class Viewer {
  constructor(root) {
    this.root = root;
    this.config = JSON.parse(root.querySelector("script.vw-config").textContent);
    this.frames = this.config.frames;
    this.element = root.querySelector(".vw-viewport");
    this.overlay = root.querySelector(".vw-heatmap");
    this.heatmaps = new Map(); // frame index -> Promise<canvas>
    this.id = `lungcad-viewer-${++counter}`;
  }

  q(selector) {
    return this.root.querySelector(selector);
  }

  async start() {
    await initialise();
    this.engine = new RenderingEngine(this.id);
    this.engine.enableElement({
      viewportId: this.id, type: Enums.ViewportType.STACK, element: this.element,
      defaultOptions: { background: [0, 0, 0] },
    });
    this.viewport = this.engine.getViewport(this.id);
    this.element.oncontextmenu = (e) => e.preventDefault(); // right drag zooms

    const group = ToolGroupManager.createToolGroup(this.id);
    const { MouseBindings, KeyboardBindings } = ToolEnums;
    group.addTool(WindowLevelTool.toolName);
    group.addTool(PanTool.toolName);
    group.addTool(ZoomTool.toolName);
    group.addTool(StackScrollTool.toolName);
    group.setToolActive(WindowLevelTool.toolName, { bindings: [{ mouseButton: MouseBindings.Primary }] });
    group.setToolActive(PanTool.toolName, {
      bindings: [{ mouseButton: MouseBindings.Auxiliary },
        { mouseButton: MouseBindings.Primary, modifierKey: KeyboardBindings.Shift }],
    });
    group.setToolActive(ZoomTool.toolName, {
      bindings: [{ mouseButton: MouseBindings.Secondary },
        { mouseButton: MouseBindings.Primary, modifierKey: KeyboardBindings.Ctrl }],
    });
    group.setToolActive(StackScrollTool.toolName, { bindings: [{ mouseButton: MouseBindings.Wheel }] });
    group.addViewport(this.id, this.id);

    const { Events } = Enums;
    this.element.addEventListener(Events.IMAGE_RENDERED, () => this.drawHeatmap());
    this.element.addEventListener(Events.STACK_NEW_IMAGE, () => this.frameChanged());
    this.element.addEventListener(Events.VOI_MODIFIED, () => this.showWindow());
    this.element.addEventListener("keydown", (e) => this.key(e));
    // the tools take the mouse events: focus by hand, so the keys work after a click or a drag on the image
    this.element.addEventListener("pointerdown", () => this.element.focus({ preventScroll: true }));
    new ResizeObserver(() => this.engine.resize(true, true)).observe(this.element);

    this.q(".vw-presets").addEventListener("click", (e) => {
      const button = e.target.closest("button[data-preset]");
      if (button) this.preset(button.dataset.preset);
    });
    this.q(".vw-reset").addEventListener("click", () => {
      this.viewport.resetCamera();
      this.viewport.render();
    });
    this.q(".vw-heat-toggle").addEventListener("change", () => this.drawHeatmap());
    this.q(".vw-opacity").addEventListener("input", () => this.drawHeatmap());
    this.q(".vw-prev").addEventListener("click", () => this.scroll(-1));
    this.q(".vw-next").addEventListener("click", () => this.scroll(1));
    drawLegend(this.q(".vw-legend-bar"));

    await this.viewport.setStack(this.frames.map((f) => `${SCHEME}:${f.pixels}`), 0);
    // setStack resolves even when the image could not be displayed (Cornerstone logs the error): check.
    if (!this.viewport.getImageData()) throw new Error("the image could not be displayed");
    this.preset(this.config.initial);
    this.frameChanged();
    this.root.dataset.state = "ready";
    this.message("");
  }

  message(text) {
    const box = this.q(".vw-message");
    box.textContent = text;
    box.hidden = !text;
  }

  index() {
    return this.viewport.getCurrentImageIdIndex();
  }

  scroll(delta) {
    const n = this.frames.length;
    const target = Math.min(n - 1, Math.max(0, this.index() + delta));
    if (target !== this.index()) this.viewport.setImageIdIndex(target);
  }

  key(e) {
    const steps = { ArrowUp: -1, ArrowLeft: -1, ArrowDown: 1, ArrowRight: 1, PageUp: -10, PageDown: 10 };
    if (e.key in steps) {
      this.scroll(steps[e.key]);
    } else if (e.key === "Home") {
      this.viewport.setImageIdIndex(0);
    } else if (e.key === "End") {
      this.viewport.setImageIdIndex(this.frames.length - 1);
    } else {
      return;
    }
    e.preventDefault();
  }

  preset(key) {
    const p = this.config.presets.find((x) => x.key === key) || this.config.presets[0];
    if (p.width) {
      this.viewport.setProperties({ voiRange: { lower: p.level - p.width / 2, upper: p.level + p.width / 2 } });
    } else {
      this.viewport.resetProperties(); // no preset window (not CT): the image's min-max, set by the loader
    }
    this.viewport.render();
    for (const b of this.root.querySelectorAll("button[data-preset]")) {
      b.setAttribute("aria-pressed", String(b.dataset.preset === p.key));
    }
    this.showWindow();
  }

  showWindow() {
    const voi = this.viewport.getProperties().voiRange;
    if (!voi) return;
    const width = voi.upper - voi.lower;
    const level = (voi.upper + voi.lower) / 2;
    const unit = this.config.unit === "HU" ? " HU" : "";
    this.q(".vw-wl").textContent = `L ${Math.round(level)} / W ${Math.round(width)}${unit}`;
    this.root.dataset.level = String(level);
    this.root.dataset.width = String(width);
  }

  frameChanged() {
    const i = this.index();
    const frame = this.frames[i] || {};
    this.root.dataset.frameIndex = String(i);
    this.q(".vw-frame").textContent = `${frame.label || "Image"} · ${i + 1} / ${this.frames.length}`;
    this.drawHeatmap();
    // the neighbours, so scrolling on does not wait for the network (cached by Cornerstone)
    const ids = this.viewport.getImageIds();
    for (const j of [i + 1, i - 1]) {
      if (j >= 0 && j < ids.length) imageLoader.loadAndCacheImage(ids[j]).catch(() => {});
    }
  }

  heatmap(i) {
    if (!this.heatmaps.has(i)) {
      const url = this.frames[i].heatmap;
      this.heatmaps.set(i, url ? fetchNpy(url).then(heatmapCanvas) : Promise.resolve(null));
    }
    return this.heatmaps.get(i);
  }

  // The overlay canvas lies over the viewport; the heatmap is drawn into it through the affine map from
  // image pixels to screen that Cornerstone's camera gives (zoom and pan included), after every render.
  async drawHeatmap() {
    const overlay = this.overlay;
    const ratio = window.devicePixelRatio || 1;
    const { clientWidth: w, clientHeight: h } = this.element;
    if (overlay.width !== Math.round(w * ratio) || overlay.height !== Math.round(h * ratio)) {
      overlay.width = Math.round(w * ratio);
      overlay.height = Math.round(h * ratio);
    }
    const ctx = overlay.getContext("2d");
    const on = this.q(".vw-heat-toggle").checked;
    const opacity = Number(this.q(".vw-opacity").value) / 100;
    this.q(".vw-opacity-value").textContent = `${Math.round(opacity * 100)} %`;
    this.root.dataset.heatmap = on ? "on" : "off";
    const i = this.index();
    let canvas = null;
    if (on) {
      try {
        canvas = await this.heatmap(i);
      } catch (err) {
        this.message(`Heatmap unavailable: ${err.message}`);
      }
    }
    if (i !== this.index()) return; // scrolled on meanwhile: that frame's draw takes over
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, overlay.width, overlay.height);
    if (!on || !canvas) return;
    const vp = this.viewport;
    const [rows, columns] = [canvas.height, canvas.width];
    const p00 = vp.worldToCanvas([-0.5, -0.5, 0]); // pixel centres sit at integer world coordinates
    const p10 = vp.worldToCanvas([columns - 0.5, -0.5, 0]);
    const p01 = vp.worldToCanvas([-0.5, rows - 0.5, 0]);
    ctx.setTransform(
      (ratio * (p10[0] - p00[0])) / columns, (ratio * (p10[1] - p00[1])) / columns,
      (ratio * (p01[0] - p00[0])) / rows, (ratio * (p01[1] - p00[1])) / rows,
      ratio * p00[0], ratio * p00[1],
    );
    ctx.globalAlpha = opacity;
    ctx.imageSmoothingEnabled = false; // the heatmap's own pixels, as the model's explanation maps them
    ctx.drawImage(canvas, 0, 0);
    this.root.dataset.heatmapDrawn = String(i);
  }
}

async function main() {
  for (const root of document.querySelectorAll(".lungcad-viewer")) {
    const viewer = new Viewer(root);
    root.lungcadViewer = viewer;
    try {
      await viewer.start();
    } catch (err) {
      root.dataset.state = "error";
      viewer.message(`The viewer could not start: ${err.message}`);
      console.error(err);
    }
  }
}

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", main);
else main();
