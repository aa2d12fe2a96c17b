"""Static checks of the Slicer module, which cannot be loaded without the Slicer application:
the Python files compile and import only what Slicer has; every ``self.ui.<name>`` exists in
the .ui file; the .ui is valid XML made of Slicer/CTK/Qt widgets and its parameter bindings
match the parameter node; the CMake lists ship every engine file and resource; the extension
metadata is complete."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "MultiModalAnalysis"
MODULE_FILE = MODULE_DIR / "MultiModalAnalysis.py"
SLICER_LIB = MODULE_DIR / "MultiModalAnalysisSlicerLib"
UI_FILE = ROOT / "Resources" / "UI" / "MultiModalAnalysis.ui"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
ENGINE_DIR = ROOT / "MultiModalAnalysisLib"

# Widget classes a Slicer build provides to loadUI: Qt, CTK and Slicer's qMRML/qSlicer widgets.
ALLOWED_WIDGET_CLASSES = {
    "QWidget", "QLabel", "QPushButton", "QToolButton", "QCheckBox", "QRadioButton", "QComboBox",
    "QSpinBox", "QDoubleSpinBox", "QLineEdit", "QTextEdit", "QPlainTextEdit", "QProgressBar",
    "QTableWidget", "QTreeWidget", "QListWidget", "QGroupBox", "QFrame", "QTabWidget",
    "QStackedWidget", "QScrollArea", "QSlider", "QSplitter",
    "ctkCollapsibleButton", "ctkCollapsibleGroupBox", "ctkPathLineEdit", "ctkDirectoryButton",
    "ctkSliderWidget", "ctkRangeWidget", "ctkDoubleSpinBox", "ctkComboBox", "ctkCheckBox",
    "ctkMenuButton",
    "qMRMLWidget", "qMRMLNodeComboBox", "qMRMLCheckableNodeComboBox",
    "qMRMLSegmentSelectorWidget", "qMRMLTableView", "qMRMLSubjectHierarchyTreeView",
    "qMRMLSubjectHierarchyComboBox", "qSlicerWidget",
}
ALLOWED_LAYOUT_CLASSES = {"QVBoxLayout", "QHBoxLayout", "QFormLayout", "QGridLayout"}
# Which widget class connectGui pairs with which parameter type (Slicer's guiConnectors).
CONNECTABLE = {
    "QCheckBox": {"bool"},
    "QComboBox": {"Choice"},
    "QSpinBox": {"int"},
    "QSlider": {"int"},
    "ctkSliderWidget": {"float"},
    "QDoubleSpinBox": {"float"},
    "QLineEdit": {"str"},
    "ctkPathLineEdit": {"Path"},
    "ctkDirectoryButton": {"Path"},
    "qMRMLNodeComboBox": {"node"},
}
# Top-level imports the module may use: Slicer's own Python plus the standard library; the
# engine only through modules that need nothing but numpy and SimpleITK.
ALLOWED_TOP_LEVEL_IMPORTS = {
    "logging", "os", "sys", "time", "pathlib", "typing", "shlex", "importlib",
    "qt", "ctk", "vtk", "slicer",
    "MultiModalAnalysisSlicerLib",
    "MultiModalAnalysisLib",
}
LIGHT_ENGINE_MODULES = (
    "MultiModalAnalysisLib.mrml", "MultiModalAnalysisLib.errors", "MultiModalAnalysisLib.jobs",
    "MultiModalAnalysisLib.workflow", "MultiModalAnalysisLib.nodes",
    "MultiModalAnalysisLib.modality_guess", "MultiModalAnalysisLib.dependencies",
)


def module_python_files() -> list[Path]:
    return [MODULE_FILE, *sorted(SLICER_LIB.glob("*.py"))]


# ---------------------------------------------------------------------------- python files


@pytest.mark.parametrize("path", module_python_files(), ids=lambda p: p.name)
def test_module_python_file_compiles(path):
    compile(path.read_text(), str(path), "exec")


def _top_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", module_python_files(), ids=lambda p: p.name)
def test_module_imports_at_load_time_only_what_slicer_ships(path):
    extra = _top_level_imports(path) - ALLOWED_TOP_LEVEL_IMPORTS
    assert not extra, f"{path.name} imports {sorted(extra)} at module level: import them inside " \
                      "the function that needs them (after the dependency check)."


def test_engine_modules_the_module_loads_pull_in_no_heavy_package():
    code = (
        "import sys\n"
        f"for name in {LIGHT_ENGINE_MODULES!r}: __import__(name)\n"
        "heavy = {'torch', 'monai', 'pandas', 'sklearn', 'skimage', 'matplotlib', 'slicer'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]", (
        f"importing {LIGHT_ENGINE_MODULES} loads {result.stdout.strip()}: Slicer would need them "
        "installed before the module could even be shown."
    )


# ---------------------------------------------------------------------------------- the .ui


def ui_tree() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


def ui_widgets() -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in ui_tree().iter("widget")}


def test_ui_file_is_valid_xml_with_only_slicer_ctk_and_qt_widgets():
    root = ui_tree()
    assert root.tag == "ui" and root.find("class").text == "MultiModalAnalysis"
    classes = set(ui_widgets().values())
    unknown = classes - ALLOWED_WIDGET_CLASSES
    assert not unknown, f"widget classes not known to Slicer/CTK/Qt: {sorted(unknown)}"
    layouts = {layout.get("class") for layout in root.iter("layout")}
    assert layouts <= ALLOWED_LAYOUT_CLASSES, layouts
    custom = {c.find("class").text for c in root.iter("customwidget")}
    needed = {c for c in classes if c.startswith(("ctk", "qMRML", "qSlicer"))}
    assert needed <= custom, f"declare these in <customwidgets>: {sorted(needed - custom)}"
    names = [w.get("name") for w in root.iter("widget")]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    assert not duplicates, f"duplicate widget names: {duplicates}"


def test_every_ui_name_the_widget_uses_exists_in_the_ui_file():
    used = set()
    for path in module_python_files():
        used |= set(re.findall(r"self\.ui\.(\w+)", path.read_text()))
    # the widget also reaches buttons by name through _actionButtons
    tree = ast.parse(MODULE_FILE.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "_actionButtons" for t in node.targets
        ):
            used |= {e.value for e in node.value.elts}
    missing = used - set(ui_widgets())
    assert used and not missing, f"self.ui names missing from {UI_FILE.name}: {sorted(missing)}"


def test_every_node_selector_gets_the_scene():
    widgets = ui_widgets()
    selectors = {n for n, c in widgets.items() if c.startswith("qMRML") and c != "qMRMLWidget"}
    connected = {
        c.find("receiver").text for c in ui_tree().iter("connection")
        if c.find("signal").text == "mrmlSceneChanged(vtkMRMLScene*)"
    }
    assert selectors <= connected, f"no setMRMLScene connection: {sorted(selectors - connected)}"


def test_every_volume_selector_offers_scalar_volumes_only():
    # A labelmap or a vector volume is a vtkMRMLScalarVolumeNode subclass: without
    # showChildNodeTypes = False a selector would offer them as images to analyse.
    for widget in ui_tree().iter("widget"):
        types = [t.text for p in widget.findall("property") if p.get("name") == "nodeTypes"
                 for t in p.iter("string")]
        if "vtkMRMLScalarVolumeNode" in types:
            shown = [p.find("bool").text for p in widget.findall("property")
                     if p.get("name") == "showChildNodeTypes"]
            assert shown == ["false"], f"{widget.get('name')}: set showChildNodeTypes false"
    for path in module_python_files():
        text = path.read_text()
        for selector in re.findall(r"(\w+)\.nodeTypes = \[\"vtkMRMLScalarVolumeNode\"\]", text):
            assert f"{selector}.showChildNodeTypes = False" in text, (
                f"{path.name}: {selector} offers labelmaps and vector volumes")


def _parameter_types() -> dict[str, str]:
    """Parameter name -> the kind of GUI it can bind to, read from the wrapper class."""
    tree = ast.parse((SLICER_LIB / "parameters.py").read_text())
    wrapper = next(
        n for n in tree.body
        if isinstance(n, ast.ClassDef)
        and any(getattr(d, "id", "") == "parameterNodeWrapper" for d in n.decorator_list)
    )
    kinds = {}
    for item in wrapper.body:
        if isinstance(item, ast.AnnAssign):
            text = ast.unparse(item.annotation)
            if "Choice(" in text:
                kind = "Choice"
            elif text.startswith("list["):
                kind = "list"
            elif "vtkMRML" in text:
                kind = "node"
            else:
                kind = re.sub(r"Annotated\[(\w+),.*", r"\1", text)
            kinds[item.target.id] = kind
    return kinds


def test_ui_parameter_bindings_match_the_parameter_node():
    kinds = _parameter_types()
    problems = []
    bound = {}
    for widget in ui_tree().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                name = prop.find("string").text
                bound[name] = widget.get("name")
                accepted = CONNECTABLE.get(widget.get("class"), set())
                if name not in kinds:
                    problems.append(f"{widget.get('name')} binds unknown parameter '{name}'")
                elif kinds[name] not in accepted:
                    problems.append(f"{widget.get('name')} ({widget.get('class')}) cannot show "
                                    f"'{name}' of kind {kinds[name]}")
    # Every scalar setting is on screen; lists and outputs are kept by code.
    unbound = {n for n, k in kinds.items() if k != "list" and not n.startswith("output")}
    unbound -= set(bound)
    assert not problems, "\n".join(problems)
    assert not unbound, f"parameters without a widget: {sorted(unbound)}"


# ----------------------------------------------------------------------------- packaging


def cmake_list(name: str) -> list[str]:
    text = MODULE_CMAKE.read_text()
    match = re.search(rf"set\({name}\s*\n(.*?)\)", text, re.S)
    assert match, f"no set({name} ...) in {MODULE_CMAKE}"
    items = [line.split("#")[0].strip() for line in match.group(1).splitlines()]
    return [i.replace("${MODULE_NAME}", "MultiModalAnalysis") for i in items if i]


def _tracked(base: Path, pattern: str) -> set[str]:
    return {
        str(p.relative_to(ROOT if base != MODULE_DIR else MODULE_DIR))
        for p in base.rglob(pattern)
        if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".pyc")
    }


def _compare(listed: list[str], present: set[str], list_name: str) -> list[str]:
    problems = []
    missing = sorted(present - set(listed))
    absent = sorted(set(listed) - present)
    if missing:
        problems.append(f"missing from {list_name} in MultiModalAnalysis/CMakeLists.txt: "
                        + ", ".join(missing))
    if absent:
        problems.append(f"listed in {list_name} but not in the repository: " + ", ".join(absent))
    return problems


def test_cmake_lists_every_engine_file_module_script_resource_sample_and_model():
    engine_py = {p for p in _tracked(ENGINE_DIR, "*") if p.endswith(".py")}
    engine_data = {p for p in _tracked(ENGINE_DIR, "*") if not p.endswith(".py")}
    module_py = set(_tracked(MODULE_DIR, "*.py"))
    resources = {
        p
        for folder in ("UI", "Icons")
        for p in _tracked(ROOT / "Resources" / folder, "*")
        if not p.endswith(".py")  # the icon's generator is not shipped
    }
    samples = _tracked(ROOT / "Resources" / "SampleData", "*")
    models = _tracked(ROOT / "Resources" / "Models", "*")
    assert "Resources/Models/sts_gtv/model.pt" in models
    problems = (
        _compare(cmake_list("ENGINE_PYTHON_SCRIPTS"), engine_py, "ENGINE_PYTHON_SCRIPTS")
        + _compare(cmake_list("ENGINE_DATA_FILES"), engine_data, "ENGINE_DATA_FILES")
        + _compare(cmake_list("MODULE_PYTHON_SCRIPTS"), module_py, "MODULE_PYTHON_SCRIPTS")
        + _compare(cmake_list("MODULE_RESOURCE_FILES"), resources, "MODULE_RESOURCE_FILES")
        + _compare(cmake_list("SAMPLE_DATA_FILES"), samples, "SAMPLE_DATA_FILES")
        + _compare(cmake_list("MODEL_FILES"), models, "MODEL_FILES")
    )
    assert not problems, "\n".join(problems)


_CMAKE_STUBS = """
# Script mode sets CMAKE_BINARY_DIR to the working directory (the test's tmp_path).
set(CALLS ${CMAKE_BINARY_DIR}/calls.txt)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.8/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.8/qt-scripted-modules)
set(BUILD_TESTING ON)
function(install)
endfunction()
function(slicer_add_python_unittest)
  cmake_parse_arguments(T "" "SCRIPT" "" ${ARGN})
  file(APPEND ${CALLS} "unittest ${T_SCRIPT}\\n")
endfunction()
function(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(M "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  foreach(s IN LISTS M_SCRIPTS)
    # Where ctkMacroCompilePythonScript puts each script, relative to qt-scripted-modules.
    if(IS_ABSOLUTE ${s})
      file(RELATIVE_PATH s ${CMAKE_CURRENT_BINARY_DIR} ${s})
      set(src ${CMAKE_CURRENT_BINARY_DIR}/${s})
    else()
      set(src ${CMAKE_CURRENT_SOURCE_DIR}/${s})
    endif()
    if(NOT EXISTS ${src})
      message(FATAL_ERROR "missing script ${src}")
    endif()
    file(APPEND ${CALLS} "script ${s}\\n")
  endforeach()
  foreach(r IN LISTS M_RESOURCES)
    if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${r})
      message(FATAL_ERROR "missing resource ${r}")
    endif()
    file(APPEND ${CALLS} "resource ${r}\\n")
  endforeach()
  file(APPEND ${CALLS} "generic_tests ${M_WITH_GENERIC_TESTS}\\n")
endfunction()
set(CMAKE_CURRENT_SOURCE_DIR ${PROJECT_SOURCE_DIR}/MultiModalAnalysis)
set(CMAKE_CURRENT_BINARY_DIR ${CMAKE_BINARY_DIR}/MultiModalAnalysis)
include(${PROJECT_SOURCE_DIR}/MultiModalAnalysis/CMakeLists.txt)
"""


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_module_cmake_runs_and_ships_the_engine_next_to_the_module(tmp_path):
    script = tmp_path / "check.cmake"
    script.write_text(_CMAKE_STUBS)
    result = subprocess.run(
        ["cmake", f"-DPROJECT_SOURCE_DIR={ROOT}", "-P", str(script)],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    scripts = {c.split(" ", 1)[1] for c in calls if c.startswith("script ")}
    assert "MultiModalAnalysis.py" in scripts
    assert "MultiModalAnalysisLib/mrml.py" in scripts  # lands next to the module
    modules = tmp_path / "lib/Slicer-5.8/qt-scripted-modules"
    assert (modules / "Resources/UI/MultiModalAnalysis.ui").is_file()
    assert (modules / "Resources/Icons/MultiModalAnalysis.png").is_file()
    assert "generic_tests TRUE" in calls and "unittest MultiModalAnalysis.py" in calls
    sample = tmp_path / "lib/Slicer-5.8/qt-scripted-modules/Resources/SampleData/STS_002"
    assert (sample / "CT_image.nii.gz").is_file()


def test_extension_metadata_is_complete():
    text = (ROOT / "CMakeLists.txt").read_text()
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL",
                "SCREENSHOTURLS", "DEPENDS"):
        match = re.search(rf'set\(EXTENSION_{key} "([^"]+)"\)', text)
        assert match and match.group(1).strip(), f"EXTENSION_{key} is empty"
    assert re.search(r'set\(EXTENSION_DEPENDS "PyTorch"\)', text)
    assert "add_subdirectory(MultiModalAnalysis)" in text
    icon_url = re.search(r'set\(EXTENSION_ICONURL "([^"]+)"\)', text).group(1)
    icon_path = icon_url.split("/main/", 1)[1]
    assert (ROOT / icon_path).is_file(), f"the icon URL points at {icon_path}, not in the repo"


def test_icon_is_a_128_pixel_png():
    from PIL import Image

    with Image.open(ROOT / "Resources" / "Icons" / "MultiModalAnalysis.png") as icon:
        assert icon.format == "PNG" and icon.size == (128, 128)
        colours = len(np.unique(np.asarray(icon.convert("RGB")).reshape(-1, 3), axis=0))
    assert colours > 500  # a picture, not a flat placeholder


def test_extensions_index_entry_follows_the_catalog_schema():
    entry = json.loads(
        (ROOT / "Resources" / "ExtensionsIndex" / "MultiModalAnalysis.json").read_text()
    )
    # Slicer/Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type",
               "build_dependencies", "dicom_support_rule", "build_subdirectory", "enabled", "tier"}
    assert {"$schema", "category", "scm_url"} <= set(entry) <= allowed
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json#")
    assert entry["build_dependencies"] == ["PyTorch"]  # must match EXTENSION_DEPENDS
    text = (ROOT / "CMakeLists.txt").read_text()
    assert f'set(EXTENSION_CATEGORY "{entry["category"]}")' in text
    homepage = re.search(r'set\(EXTENSION_HOMEPAGE "([^"]+)"\)', text).group(1)
    assert entry["scm_url"].removesuffix(".git") == homepage
    assert 1 <= entry["tier"] <= 5


def test_the_modules_registration_choices_are_the_engines():
    """The parameter node offers the engine's registration types: it imports them (no copy
    of its own that could fall behind) and uses them for ``registrationType``."""
    from MultiModalAnalysisLib import workflow

    tree = ast.parse((SLICER_LIB / "parameters.py").read_text())
    imported = {
        alias.name for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.module == "MultiModalAnalysisLib.workflow"
        for alias in node.names if alias.asname is None
    }
    assigned = {target.id for node in tree.body if isinstance(node, ast.Assign)
                for target in node.targets if isinstance(target, ast.Name)}
    assert "REGISTRATION_TYPES" in imported and "REGISTRATION_TYPES" not in assigned
    assert "landmarks" in workflow.REGISTRATION_TYPES
    assert "Choice(list(REGISTRATION_TYPES))" in ast.unparse(tree)
