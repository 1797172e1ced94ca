"""The Pareto-front explorer, for `streamlit run app.py -- --results results`.

The same app as `paretoopt app`; its code lives in paretoopt/app.py.
"""

from paretoopt.app import main

main()
