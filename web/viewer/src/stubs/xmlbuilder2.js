// vtk.js's XML readers/writers (VTP meshes, Cornerstone's mesh cache and orientation marker) import
// xmlbuilder2, whose Node build needs Node's `url` and `events`. lungcad's viewer shows 2-D images only
// and never reads or writes VTK XML, so the bundle gets this stub instead (see build.mjs).
export function create() {
  throw new Error("VTK XML I/O is not part of lungcad's viewer bundle");
}
