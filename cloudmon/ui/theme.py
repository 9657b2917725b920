"""The console's look: Fusion style plus one small style sheet (light theme)."""

from __future__ import annotations

from PySide6.QtWidgets import QApplication

STYLE_SHEET = """
QMainWindow, QWidget#nodePage { background: #f6f7f9; }
QTabWidget#pages::pane { border: none; }
QTabBar::tab { padding: 6px 14px; margin-right: 2px; }
QToolBar#mainToolbar {
    background: #ffffff; border: none; border-bottom: 1px solid #dfe2e6; spacing: 4px; padding: 3px 8px;
}
QToolBar#mainToolbar QToolButton { padding: 4px 12px; border: 1px solid transparent; border-radius: 4px; }
QToolBar#mainToolbar QToolButton:hover { background: #eef2f8; border-color: #d0d7e2; }
QLabel#banner { padding: 7px 14px; font-weight: bold; }
QLabel#simulationRibbon { padding: 6px 14px; font-weight: bold; background: #ede7f6; color: #4527a0; border-bottom: 1px solid #c5b8e8; }
QLabel#banner[level="severe"] { background: #fdecea; color: #8a1c12; border-bottom: 1px solid #f5c2bd; }
QLabel#banner[level="warn"] { background: #fff4d6; color: #6b4a00; border-bottom: 1px solid #f0d58a; }
QLabel#warningLabel[level="severe"] { color: #b3261e; font-weight: bold; }
QLabel#warningLabel[level="warn"] { color: #8a5a00; font-weight: bold; }
QLabel#countLabel, QLabel#rangeInfo, QLabel#nodeFacts { color: #5f6673; }
QLabel#statusPill { border-radius: 9px; padding: 2px 10px; font-weight: bold; }
QLabel#statusPill[state="online"] { background: #e3f4e8; color: #1e7a3c; }
QLabel#statusPill[state="down"] { background: #fdecea; color: #b3261e; }
QTableView#nodeTable { outline: 0; } /* rows are selected whole: no dotted frame around one cell */
QTableView#nodeTable, QTableWidget {
    background: #ffffff; alternate-background-color: #fafbfc; border: 1px solid #dfe2e6;
    selection-background-color: #d6e4fb; selection-color: #111;
}
QTabBar QToolButton#tabClose { border: none; padding: 0 3px; color: #6b7280; font-size: 12pt; }
QTabBar QToolButton#tabClose:hover { color: #b3261e; }
QHeaderView::section {
    background: #f1f3f6; border: none; border-bottom: 1px solid #dfe2e6; border-right: 1px solid #e6e8eb;
    padding: 4px 6px; font-weight: bold; color: #3c4048;
}
QLabel#emptyTitle { font-size: 18pt; color: #3c4048; }
QLabel#emptyHint { color: #5f6673; }
QPushButton#emptyAddButton { padding: 6px 18px; }
QToolButton#rangeButton {
    border: 1px solid #c3c8d0; border-left: none; padding: 4px 14px; background: #ffffff; color: #3c4048;
}
QToolButton#rangeButton[segment="first"] {
    border-left: 1px solid #c3c8d0; border-top-left-radius: 4px; border-bottom-left-radius: 4px;
}
QToolButton#rangeButton[segment="last"] { border-top-right-radius: 4px; border-bottom-right-radius: 4px; }
QToolButton#rangeButton:checked { background: #1f5fbf; color: #ffffff; border-color: #1f5fbf; }
QToolButton#rangeButton:hover:!checked { background: #eef2f8; }
QWidget#fsBox { background: #ffffff; border: 1px solid #dfe2e6; }
QLabel#loopbackWarning {
    background: #fff4d6; border: 1px solid #f0d58a; border-radius: 4px; padding: 8px; color: #4a3600;
}
QLabel#dialogNote { color: #5f6673; }
"""


def apply_theme(app: QApplication) -> None:
    """Fusion looks the same on every platform and under Xvfb; the sheet adds the rest."""
    app.setStyle("Fusion")
    app.setStyleSheet(STYLE_SHEET)
